// liblz4 (Debian liblz4-dev): the block format only.
#include <lz4.h>
