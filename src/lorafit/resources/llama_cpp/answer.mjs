// Greedy llama.cpp answers for pre-rendered chat prompts, via node-llama-cpp 3.21.1 (prebuilt CPU binaries).
// stdin:  {"model": "/path/x.gguf", "prompts": ["<|im_start|>...assistant\n", ...], "max_tokens": 48, "threads": 2}
//         optional: "context_size" (default: longest prompt + max_tokens, rounded up to 256),
//                   "stop_tokens" ([int]; default: every EOG token of the model, e.g. [2, 0] for SmolLM2),
//                   "kv_cache_type" ("F32" | "F16"; default F16 - F32 brings llama.cpp closer to fp32 transformers)
// stdout: {"answers": [{"text": str, "stopped": bool, "tokens": [int...], "prompt_tokens": [int...]}], "seconds": float,
//          "load_seconds": float, "context_size": int, "eog": [int...]}   -- nothing else is written to stdout.
// exit 1 with a message on stderr on any error.

// Keep stdout clean: anything the JS library would console.log goes to stderr.
console.log = console.info = console.debug = (...a) => console.error(...a);
process.env.NODE_LLAMA_CPP_DEBUG ??= "false";

const t0 = performance.now();

async function readStdin() {
    const chunks = [];
    for await (const c of process.stdin) chunks.push(c);
    return Buffer.concat(chunks).toString("utf8");
}

async function main() {
    const req = JSON.parse(await readStdin());
    const { model: modelPath, prompts } = req;
    const maxTokens = req.max_tokens ?? 48;
    const threads = req.threads ?? 2;
    if (typeof modelPath !== "string" || !Array.isArray(prompts))
        throw new Error('input must be {"model": str, "prompts": [str, ...]}');

    const { getLlama, LlamaLogLevel } = await import("node-llama-cpp");
    const llama = await getLlama({
        gpu: false,                // CPU only: deterministic, no CUDA/Vulkan probing
        build: "never",            // never compile; throw NoBinaryFoundError if no prebuilt binary works
        skipDownload: true,        // never fetch llama.cpp sources
        usePrebuiltBinaries: true,
        progressLogs: "stderr",
        logLevel: LlamaLogLevel.disabled,
        logger: () => {},          // silence llama.cpp's own log callback
        maxThreads: threads,       // caps the thread pool
    });
    const model = await llama.loadModel({ modelPath, gpuLayers: 0, useMmap: true });

    // special tokens parsed (<|im_start|> -> one id); node-llama-cpp never adds BOS here (add_special=false)
    const promptTokens = prompts.map((p) => model.tokenize(p, true));
    const longest = Math.max(1, ...promptTokens.map((t) => t.length));
    const contextSize = req.context_size ?? Math.ceil((longest + maxTokens + 8) / 256) * 256;

    const context = await model.createContext({
        contextSize,               // a fixed number: "auto" would size up to the train context
        sequences: 1,
        threads: { ideal: threads, min: threads },
        flashAttention: false,     // same attention kernel on every machine
        ignoreMemorySafetyChecks: true,
        failedCreationRemedy: false,
        // "F32" keeps the KV cache in full precision (default F16); marked experimental by node-llama-cpp
        ...(req.kv_cache_type ? { experimentalKvCacheKeyType: req.kv_cache_type, experimentalKvCacheValueType: req.kv_cache_type } : {}),
    });
    const sequence = context.getSequence();
    const stopSet = Array.isArray(req.stop_tokens) ? new Set(req.stop_tokens) : null;
    const isStop = (t) => (stopSet ? stopSet.has(t) : model.isEogToken(t));
    const loadSeconds = (performance.now() - t0) / 1000;

    const t1 = performance.now();
    const answers = [];
    for (const tokens of promptTokens) {
        await sequence.clearHistory();
        const out = [];
        let stopped = false;
        let stopToken = null;
        if (maxTokens > 0) {
            for await (const token of sequence.evaluate(tokens, {
                temperature: 0,    // -> llama_sampler_init_greedy (pure argmax); no top-k/p, no penalties
                yieldEogToken: true,
            })) {
                if (isStop(token)) { stopped = true; stopToken = token; break; }
                out.push(token);
                if (out.length >= maxTokens) break;
            }
        }
        answers.push({ text: model.detokenize(out, false), stopped, stop_token: stopToken, tokens: out, prompt_tokens: tokens });
    }
    const seconds = (performance.now() - t1) / 1000;

    const eog = [];
    for (const t of [model.tokens.eos, model.tokens.eot]) if (t != null && model.isEogToken(t) && !eog.includes(t)) eog.push(t);
    const result = JSON.stringify({ answers, seconds, load_seconds: loadSeconds, context_size: context.contextSize, eog });

    await context.dispose();
    await model.dispose();
    await llama.dispose();
    await new Promise((resolve, reject) => process.stdout.write(result + "\n", (e) => (e ? reject(e) : resolve())));
}

main().then(
    () => process.exit(0),
    (err) => {
        process.stderr.write(`answer.mjs: ${err?.stack ?? err}\n`);
        process.exit(1);
    },
);
