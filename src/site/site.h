#ifndef CMG_SITE_H
#define CMG_SITE_H
/* cmg site <init|...> */
int cmg_site_main(int argc, char **argv);
#endif
