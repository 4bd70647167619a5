// libFuzzer's driver, called from each target's main: SwiftPM links an executable target with
// its own entry point (TARGET_main), so libFuzzer's main is not the one that runs.
#include <stddef.h>
#include <stdint.h>

int LLVMFuzzerRunDriver(int *argc, char ***argv, int (*callback)(const uint8_t *data, size_t size));
