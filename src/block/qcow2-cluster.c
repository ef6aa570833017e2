/* placeholder: being written */
#include "block/qcow2.h"
