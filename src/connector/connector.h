#ifndef CMG_CONNECTOR_H
#define CMG_CONNECTOR_H
/* cmg connector -c FILE */
int cmg_connector_main(int argc, char **argv);
#endif
