/* placeholder: being written */
#include "job/backup.h"
