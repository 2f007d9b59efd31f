"""Definitions of every metric and column the report shows, as the code computes them
(``specmoe/predictors/metrics.py``, the simulator, the measured replay)."""

TRACE_TERMS = (
    (
        "entropy (bits)",
        (
            "Entropy of a layer's expert usage (share of routed slots per expert); log2 E bits when every expert is "
            "used equally."
        ),
    ),
    ("most used expert (share)", "The expert with the most routed slots in the layer, and its share of them."),
    ("experts never used", "Experts of the layer that no token of the traces was routed to."),
    ("dropped", "Share of tokens whose top-1 slot was dropped (over an expert's capacity: Switch models)."),
    (
        "next-layer MI (bits)",
        "Mutual information between a token's top-1 expert at this layer and at the next (plug-in estimate).",
    ),
    (
        "next-layer lookup acc.",
        (
            "Accuracy of the best lookup table from this layer's top-1 expert to the next layer's, on the traces it "
            "was built from."
        ),
    ),
)

PREDICTOR_TERMS = (
    (
        "horizon h",
        (
            "How far ahead a prediction reaches: after MoE layer l has run for a token, the predictor ranks the "
            "experts of layer l+h."
        ),
    ),
    ("top-1", "Share of predictions whose best-scored expert is the router's top-1 expert."),
    ("hit1", "Share of predictions whose best-scored expert is among the router's k chosen experts."),
    ("exact match", "Share of predictions whose k best-scored experts are exactly the router's k experts."),
    (
        "recall@k",
        (
            "Share of the router's k experts found among the predictor's k best-scored ones: the hit rate of a "
            "prefetch of k experts. With k = 1 it equals top-1, and the tables show one column."
        ),
    ),
    (
        "recall@m",
        (
            "The same with a wider prefetch set of m experts: recall@1.5k, recall@2k, recall@3k use m = "
            "ceil(1.5k), 2k, 3k (at most all experts)."
        ),
    ),
    (
        "chance level",
        (
            "The metric's expected value for a ranking of the experts drawn uniformly at random: 1/E for top-1, "
            "k/E for hit1, m/E for recall@m (E experts)."
        ),
    ),
    (
        "bootstrap interval",
        (
            "The 95% interval [2.5th–97.5th percentile] of the metric over resamples of the test documents with "
            "replacement (predictors.bootstrap resamples). Two predictors whose intervals overlap are not told apart "
            "by this data."
        ),
    ),
    (
        "ECE",
        (
            "Expected calibration error of the confidence in the best expert: the mean gap between confidence and "
            "accuracy over confidence bins, weighted by how many predictions fall in each."
        ),
    ),
    ("params", "The predictor's learned numbers (table entries or network weights)."),
    ("µs / token / layer", "Time the predictor takes for one token at one layer on this machine."),
    (
        "of model time",
        (
            "The predictor's time per token (once after every MoE layer but the last) as a share of the model's own "
            "time per token on this machine."
        ),
    ),
    ("fit (s)", "Seconds the predictor took to fit on the training split."),
)

OFFLOAD_TERMS = (
    ("fast tier", "Memory for experts, as a share of all experts' bytes; the rest stay in the slow tier."),
    ("batch", "Sequences decoded in lockstep; a layer needs the union of their experts."),
    (
        "on-demand",
        "Reads each expert when its layer needs it and keeps nothing: the floor every other policy is compared with.",
    ),
    (
        "oracle",
        (
            "Prefetches and evicts by the recorded future: the ceiling, which no real run can reach (belady: a "
            "cache evicting by the recorded future)."
        ),
    ),
    (
        "tokens/s",
        (
            "Decoded tokens per second, over every sequence of the batch. MEASURED: wall-clock time of the timed "
            "decode steps, median of the repeats; SIMULATION: the cost model's clock."
        ),
    ),
    (
        "stall ms/token",
        "Milliseconds per token spent waiting for expert reads that had not arrived when their layer ran.",
    ),
    ("stall share", "That waiting as a share of all the time per token."),
    (
        "hit rate",
        "Share of the experts' uses served from the fast tier, already arrived, without waiting on a read.",
    ),
    ("x on-demand", "Tokens/s divided by on-demand's at the same fast tier and batch."),
    (
        "of oracle gap closed",
        (
            "SIMULATION: (on-demand's time - the policy's time) / (on-demand's time - the oracle's time): 0 is no "
            "better than on-demand, 1 is as fast as the oracle."
        ),
    ),
    ("of oracle tokens/s", "MEASURED: the policy's tokens/s divided by the oracle's."),
    (
        "[min–max]",
        "Beside a MEASURED figure: its slowest and fastest repeat. A difference inside that spread is not claimed.",
    ),
)

GLOSSARY = (("Traces", TRACE_TERMS), ("Predictors", PREDICTOR_TERMS), ("Offloading", OFFLOAD_TERMS))
