/* stub: to be written (raw driver vtable) */
#include "formats/format.h"
const struct img_driver img_driver_raw = { .name = "raw" };
