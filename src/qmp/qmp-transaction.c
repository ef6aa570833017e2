/* placeholder: being written */
#include "qmp/qmp-internal.h"
