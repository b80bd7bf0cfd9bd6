#include "connector/connector.h"
#include <stdio.h>
int cmg_connector_main(int argc, char **argv) { (void)argc; (void)argv; fputs("not yet\n", stderr); return 1; }
