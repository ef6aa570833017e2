/* placeholder: being written */
#include "qmp/qmp-internal.h"
void qmp_register_backup_commands(void) {}
