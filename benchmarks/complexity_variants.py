"""The rows of bench_complexity.py: every mha variant and token mixer, with the sizes it runs at, and which have
only one causality. A new variant adds its row here."""
from __future__ import annotations


def variants(args) -> list[tuple[str, str]]:
    """(label, the layer's call): every mha variant, then the token mixers (not attention, same place in a block)."""
    # mha(skip_reuse) has no row: it reads an earlier attention's output (E312 in a one-layer spec), and a row with
    # one before it would time and classify that attention (tests/ops/test_growth.py measures its Phi alone)
    mha = [
        ("softmax", "softmax"),
        (f"local, window={args.window}", f"local, window={args.window}"),
        (f"adaptive_span, max_span={args.max_span}, R={args.R}, span_init={args.span_init}",
         f"adaptive_span, max_span={args.max_span}, R={args.R}, span_init={args.span_init}"),
        ("linear", "linear"),
        (f"linformer, k={args.k}", f"linformer, k={args.k}, max_len={max(int(n) for n in args.ns.split(','))}"),
        ("efficient", "efficient"),
        ("fastformer", "fastformer"),
        (f"lambda, r={args.r_lambda}", f"lambda, r={args.r_lambda}"),
        (f"smart_bird, s={args.s_bird}", f"smart_bird, s={args.s_bird}"),
        (f"nystrom, landmarks={args.landmarks}, conv={args.conv}", f"nystrom, landmarks={args.landmarks}, conv={args.conv}"),
        ("fanet", "fanet"),
        ("ufo", "ufo"),
        ("simpletron", "simpletron"),
        ("separable", "separable"),
        ("performer", "performer"),
        ("rfa", "rfa"),
        ("momentum", "momentum"),
        ("flowformer", "flowformer"),
        (f"sparse, stride={args.stride}", f"sparse, stride={args.stride}"),
        (f"sparse, fixed, stride={args.stride}, c={args.c}", f"sparse, pattern=fixed, stride={args.stride}, c={args.c}"),
        (f"tglobal, radius={args.radius}, block={args.block}", f"tglobal, radius={args.radius}, block={args.block}"),
        # Longformer: with a global token (bidirectional only), and its causal form (no globals), dilated
        (f"longformer-global, window={args.window}, globals=1",
         f"longformer, window={args.window + args.window % 2}, globals=1"),
        (f"longformer, window={args.window}, dilation=2", f"longformer, window={args.window + args.window % 2}, dilation=2"),
        (f"chunk, c={args.window}", f"chunk, c={args.window}"),
        ("logsparse, conv=3", "logsparse, conv=3"),
        (f"jukebox, row, block={args.stride}", f"jukebox, block={args.stride}"),
        (f"jukebox, column, block={args.stride}", f"jukebox, pattern=column, block={args.stride}"),
        (f"jukebox, prev_row, block={args.stride}", f"jukebox, pattern=prev_row, block={args.stride}"),
        ("blockwise, blocks=4", "blockwise, blocks=4"),
        (f"long_short, w={args.window}, r={args.r}", f"long_short, w={args.window}, r={args.r}"),
        (f"fmm, w={args.window}", f"fmm, w={args.window}"),
        (f"isab, m={args.inducing}", f"isab, m={args.inducing}"),
        (f"luna, l={args.inducing}", f"luna, l={args.inducing}"),
        ("star", "star"),
        (f"skyformer, landmarks={args.landmarks}", f"skyformer, landmarks={args.landmarks}"),
        (f"soft, landmarks={args.landmarks}", f"soft, landmarks={args.landmarks}"),
        ("bigbird, block=64, random=3", "bigbird, block=64, window=3, globals=2, random=3"),
        (f"etc, radius={args.radius}, globals=16", f"etc, radius={args.radius}, globals=16"),  # ETC-base's r is 84
        (f"bpt, k={args.bpt_k}", f"bpt, k={args.bpt_k}"),
        (f"lara, C={args.landmarks}", f"lara, C={args.landmarks}"),
        ("learned_kernel", "learned_kernel"),
        ("slim", "slim"),
        ("memory_compressed, k=3", "memory_compressed, k=3"),
        ("lsh, buckets=8, chunk=64, rounds=2", "lsh, buckets=8, chunk=64, rounds=2"),
        ("combiner, block=64", "combiner, block=64"),
        ("combiner, axial, block=64", "combiner, mode=axial, block=64"),
        ("combiner, logsparse", "combiner, mode=logsparse"),
        ("hierarchical, block=16", "hierarchical, block=16"),
        ("multiscale, window=16, pool=4", "multiscale, window=16, pool=4"),
        ("dilated, dilated_mem, layer=6", "dilated, pattern=dilated_mem, layer=6"),
        (f"colt5, window={args.window}, k_q=k_kv=256", f"colt5, window={args.window}, k_q=256, k_kv=256"),
        ("fourier_integral", "fourier_integral"),
        ("mla, kv_rank=256", "mla, kv_rank=256, rope_dim=32, nope_dim=64, v_dim=64"),
        ("forgetting", "forgetting"),
        ("moba, block=64, topk=3", "moba, block=64, topk=3"),
        (f"nsa, window={args.window}", f"nsa, window={args.window}"),  # the paper's l = 32, d = 16, l' = 64, n = 16
        ("yoso, hashes=32, tau=8", "yoso, hashes=32, tau=8"),
        ("differential", "differential"),  # h heads of 2 dh: d_model divisible by 2 heads
        ("sigmoid", "sigmoid"),
        ("ngpt", "ngpt"),
        ("clustered, clusters=64", "clustered, clusters=64"),
        ("smyrf, clusters=32, rounds=2", "smyrf, clusters=32, rounds=2"),  # n / 32 keys a query: n^2 / 32
        ("scatterbrain, clusters=32, features=64", "scatterbrain, clusters=32, features=64"),  # causal: the window of 64
        ("clustered, clusters=64, topk=32", "clustered, clusters=64, topk=32"),  # improved: n (C + k) d
        ("routing, clusters=16, window=64", "routing, clusters=16, window=64"),
        ("exp_smoothing", "exp_smoothing"),
        ("retention", "retention"),  # chunks of 64: n 64 dh + n dh^2, the state dh^2 a head
        ("gla", "gla"),  # chunks of 16, a decay per key channel: n 16 dh + n dh^2
        ("gsa", "gsa"),  # two GLA passes over 64 slots in chunks of 16: n 16 (dh + m) + n m dh
        ("deltanet", "deltanet"),  # the WY form in chunks of 64: n 64 dh + n dh^2, a [64, 64] solve a chunk
        ("gated_deltanet", "gated_deltanet"),
        ("based", "based"),  # Taylor features (273 a head) in chunks of 64 and a window of 64: n 64 f^2 + n f^2 dh
        ("fwp", "fwp"),  # the delta rule on DPFP-1 (2 dh features) in chunks of 64: n 64 dh + n dh^2
        ("lightning", "lightning"),  # tiles of 64, a decay per head: n 64 dh + n dh^2
        ("hedgehog", "hedgehog"),  # 2 dh softmax features in chunks of 64: n 64 dh + n dh^2
        ("mgk, components=2", "mgk, components=2"),
        ("mgk, linear, components=2", "mgk, form=linear, components=2"),  # phi(q)^T sum_j sum_r pi_r phi(k_jr) v_j^T: n d^2
        ("nap", "nap"),  # explicit [b, h, n, n] scores, normalised per row
        ("sinkformer, iters=3", "sinkformer, iters=3"),
        ("sparse_sinkhorn, block=64", f"sparse_sinkhorn, block=64, max_len={max(int(n) for n in args.ns.split(','))}"),
        ("topk, k=64", "topk, k=64"),
        ("sac, k=64", "sac, k=64"),  # the edge scores: n^2 r in query chunks of 64; 64 edges a query gathered  # the selection's n^2 d scores in query chunks of 64; 64 keys a query gathered
        ("probsparse, factor=5", f"probsparse, factor=5, max_len={max(int(n) for n in args.ns.split(','))}"),  # n log n
        ("chord", f"chord, max_len={max(int(n) for n in args.ns.split(','))}"),  # M factors of 1 + ceil(log2 n) links: n log n
        ("softmax, softcap=50", "softmax, softcap=50"),  # the modifiers' explicit-score kernel (_scored.py)
        (f"local, window={args.window}, softcap=50, sinks=4", f"local, window={args.window}, softcap=50, sinks=4"),
        ("softmax, talking=true", "softmax, talking=true"),  # talking heads (_talking.py): the same kernel, heads mixed
        (f"local, window={args.window}, talking=true", f"local, window={args.window}, talking=true"),
        (f"local, window={args.window}, talking=8", f"local, window={args.window}, talking=8"),  # H = 8 softmax heads
        ("softmax, collab=128", "softmax, collab=128"),  # collaborative heads (_collab.py): shared Q/K of width D_k
        (f"local, window={args.window}, collab=128", f"local, window={args.window}, collab=128"),  # on the band
        ("el", "el"),  # EL-attention: SDPA of the width-d expanded queries over X
        (f"fixed, mixed, window={args.window}", f"fixed, window={args.window}"),  # hand-crafted maps: O(n w d), O(n d)
    ]
    n_max = max(int(n) for n in args.ns.split(","))
    mha += [("synthesizer, dense", f"synthesizer, kind=dense, max_len={n_max}"),  # the [b, h, n, n] weights
            ("synthesizer, random", f"synthesizer, kind=random, max_len={n_max}")]  # [h, n, n], shared by the batch
    mixers = [  # AFT-full is O(n^2 d) (w over all pairs); the local and conv forms O(n w d)
        ("aft, full", f"aft, mode=full, max_len={n_max}"),
        ("aft, simple", "aft, mode=simple"),
        (f"aft, local, window={args.window}", f"aft, mode=local, max_len={n_max}, window={args.window}"),
        (f"aft, conv, kernel={args.window | 1}", f"aft, mode=conv, kernel={args.window | 1}"),  # odd: centred when bidirectional
        ("daft", f"daft, max_len={n_max}"),
        ("fnet", "fnet"),
        ("average", "average"),  # AAN: cumulative average, FFN, gates
        ("igloo", f"igloo, max_len={n_max}"),  # IGLOO: P random patches and P gathered values a position, O(n)
        ("hamburger, nmf", "hamburger, r=8, steps=6"),  # K steps of NMF on X [e, n]: O((K + 1) n r e)
        ("hamburger, vq", "hamburger, r=8, steps=6, kind=vq"),
    ]
    ssms = [("mamba", "mamba"),  # the chunked selective scan: O(n E N), states b n E N in training
            ("mamba2", "mamba2"),  # SSD chunks of 64: O(n T (N + P) H + n N P H)
            ("lru", "lru"),  # the complex diagonal recurrence, chunked doubling: O(n N (d + log T))
            ("s5", "s5")]  # the same, ZOH-discretised HiPPO-N decays
    ssms += [("lmu, order=64", f"lmu, order=64, theta={n_max}.0, max_len={n_max}")]  # the Legendre memory by FFT: O(n q log n)
    longconvs = [("ckconv", f"ckconv, max_len={n_max}")]  # SIREN kernel at 2n lags, FFT: O(n d log n + n d^2)
    longconvs += [("flexconv", f"flexconv, max_len={n_max}")]  # MAGNet's Gabor kernel times a learned Gaussian mask
    longconvs += [("flexconv, siren", f"flexconv, kernel=siren, max_len={n_max}")]  # ckconv's kernel, masked
    longconvs += [("ccnn", f"ccnn, max_len={n_max}")]  # the CCNN block: norm, FlexConv, GELU, linear, GELU, residual
    longconvs += [(f"talk, l_max={args.window}", f"talk, l_max={args.window}, heads=4")]  # prefix sums, 4 gathers: O(n d)
    rnns = [("rwkv4", "rwkv4"),  # RWKV-4's WKV in chunks of 16: O(n T d)
            ("rwkv6", "rwkv6"),  # RWKV-6: GLA's chunked kernel, heads of 64: O(n T d + n d N)
            ("rwkv7", "rwkv7"),  # RWKV-7: the WY-chunked diagonal-plus-rank-one rule, heads of 64: O(n T d + n d N)
            ("hgrn2", "hgrn2"),  # GLA's chunks of 16 with a decay per key channel: O(n C e + n e d / H)
            ("mlstm", "mlstm"),  # chunks of 64 carrying the stabilised (C', n', m): O(n C dh + n dh^2) a head
            ("qrnn", "qrnn"),  # a width-2 convolution and fo-pooling's chunked scan: O(n d (d k + log T))
            ("gilr", "gilr"),  # two projections and the chunked scan: O(n d (d + log T))
            ("sru", "sru"),  # the light recurrence: W x at once, a token loop of elementwise ops, O(n d^2)
            ("sru, scan", "sru, scan=true"),  # v = 0: the chunked scan
            ("sru, attention", "sru, attention=true, scan=true")]  # SRU++: one causal head, O(n^2 p)
    rnns += [("rfwp", f"rfwp, heads={args.heads}")]  # the Recurrent Delta Net: a loop over tokens, O(n H dh^2)
    ssms += [("s4d", "s4d"),  # the Vandermonde kernel [d, n] and its FFT convolution: O(n N d + n log n d)
             ("bigs", "bigs"),  # two S4D branches, forward and flipped, gated: O(n N d + n log n d + n d^2)
             ("h3", "h3")]  # the shift and diagonal SSMs around k v^T: O(n s d + n N d + n log n d + n d^2)
    longconvs += [("long", f"long, max_len={n_max}"),  # the learned [d, L] kernel, by FFT: O(n log n d)
                  ("sgconv", f"sgconv, max_len={n_max}"),  # log2(L / 32) + 1 sub-kernels, upsampled: O(L d + n log n d)
                  ("hyena", f"hyena, max_len={n_max}")]  # order 2: two FFT convolutions and gates, O(n log n d + n d^2)
    return ([(f"mha({label})", f"mha({call}, heads={args.heads})") for label, call in mha]
            + [(f"mixer({label})", f"mixer({call})") for label, call in mixers]
            + [(f"ssm({label})", f"ssm({call})") for label, call in ssms]
            + [(f"rnn({label})", f"rnn({call})") for label, call in rnns]
            + [(f"longconv({label})", f"longconv({call})") for label, call in longconvs])

BIDIRECTIONAL_ONLY = ("linformer", "efficient", "fastformer", "ufo", "separable", "nystrom", "tglobal",
                      "longformer-global", "blockwise", "long_short", "isab", "star",
                      "skyformer", "soft", "bigbird", "lambda", "smart_bird", "lara",
                      "etc",
                      "fnet", "hamburger",
                      "colt5", "yoso", "clustered", "probsparse", "chord", "smyrf",
                      "sinkformer",
                      "bigs")  # no causal form: bidirectional only
CAUSAL_ONLY = ("forgetting", "moba", "exp_smoothing")  # no bidirectional form: causal only
CAUSAL_ONLY += ("retention", "gla", "deltanet", "gated_deltanet")  # the chunked linear recurrences
CAUSAL_ONLY += ("based", "fwp", "lightning", "hedgehog",)  # feature-map linear attention and fast weights (issue 14)
CAUSAL_ONLY += ("mamba", "mamba2")  # the selective state spaces
CAUSAL_ONLY += ("rwkv4", "rwkv6", "rwkv7")  # the RWKV recurrences
CAUSAL_ONLY += ("hgrn2", "mlstm")  # the linear RNNs
CAUSAL_ONLY += ("gsa",)  # Gated Slot Attention: two chunked GLA passes
CAUSAL_ONLY += ("lru", "s5", "qrnn", "gilr", "sru")  # the diagonal linear recurrences
CAUSAL_ONLY += ("lmu, order=64",)  # the Legendre memory
CAUSAL_ONLY += ("rfwp",)  # the Recurrent Delta Net (issue 14)
CAUSAL_ONLY += ("hyena",)  # the Hyena operator is defined causal
