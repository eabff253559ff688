"""The level machinery: level sizes and masks, level-structured layers, the stepping model,
the pure step functions and the compiled anytime program. Imports nothing else of the package
but the config schema and the registry."""
