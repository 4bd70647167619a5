// The declaration in include/fuzzer_driver.h is all there is: libFuzzer defines the function.
