/* cmg site init: create a site directory for a local deployment. */
#ifndef CMG_SITE_INIT_H
#define CMG_SITE_INIT_H

#include <stdio.h>

/* argv[0] is "init". Returns the exit status: 0, 1 (failure) or 2 (bad usage). */
int cmg_site_init_main(int argc, char **argv);
/* Prints the usage of 'cmg site init' to out. */
void cmg_site_init_usage(FILE *out);

#endif
