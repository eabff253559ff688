"""Ways of making levels and of giving neurons bits: the trainer table (``trainers``),
SteppingNet construction, the non-uniform baseline, neuron importance, the REINFORCE
selection module, the bit search, ProgressiveNN and the level x precision staircase."""
