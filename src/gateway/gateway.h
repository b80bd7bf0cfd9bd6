#ifndef CMG_GATEWAY_H
#define CMG_GATEWAY_H
/* cmg gateway -c FILE [--instance I] */
int cmg_gateway_main(int argc, char **argv);
#endif
