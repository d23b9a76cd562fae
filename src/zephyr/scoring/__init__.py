"""Scoring continuations of shared prefixes under a causal LM: the one way zephyr reads log-probs off a model.

`continuations` is the entry: groups (prefix ids, [continuation ids, ...]) become one packed row that runs
each prefix once (`zephyr.data.packing.collate_shared_prefix`), and one forward returns every continuation's
summed log-prob, its token count and, when asked, the distribution over the token after it. DPO's step,
its reference pass and `zephyr logps` (a pair = a prompt with two answers), multiple choice (a context with
its choices) and the log-prob judge (a prompt with its forced answer prefixes) all score through it.
`attention` holds the packed attention (the varlen kernel on CUDA, the exact dense mask elsewhere), `forward`
the decoder call and the LM head applied only to the scored positions, in chunks.
"""
