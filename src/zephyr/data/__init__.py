"""Pure data functions: chat rendering, packing, record schemas."""
