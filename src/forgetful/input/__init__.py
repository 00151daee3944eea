"""Input forgetting: a forget mask drops context tokens so the LM reads ``b < n`` of them.

The data path walks down this package: examples and batches (:mod:`.examples`) -> a policy picks
the keep set (:mod:`.policies`) -> the compression ops gather the kept tokens with their original
positions (:mod:`.compression`) -> REINFORCE trains policy and LM (:mod:`.reinforce`) ->
strategies are compared at equal budgets (:mod:`.evaluation`, with the FLOP model in
:mod:`.flops`)."""
