// llama.cpp's side of a logit comparison: greedy decoding of a prompt file, printing each step's
// 8 largest logits as JSON lines (the first line holds llama.cpp's prompt token ids). HiveMind's
// side is `cargo run -p hivemind-model --example greedy_logits`, which prints the same lines.
//
// Usage: llama-logits MODEL PROMPT_FILE N_STEPS [LORA_GGUF]
// Environment:
//   FORCE  comma-separated token ids fed instead of the greedy ones (teacher forcing), so two
//          runtimes can be compared step by step past a divergence
//   FA     0 turns flash attention off (llama.cpp's default, "auto", turns it on for the CPU)
// Built by tools/reference/build_llamacpp.sh into BUILD_DIR/build/bin/llama-logits.
#include "llama.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

int main(int argc, char ** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL PROMPT_FILE N_STEPS [LORA_GGUF]\n", argv[0]);
        return 2;
    }
    std::ifstream in(argv[2]);
    std::stringstream text;
    text << in.rdbuf();
    const std::string prompt = text.str();
    const int steps = atoi(argv[3]);
    std::vector<llama_token> force;
    if (const char * f = getenv("FORCE")) {
        std::stringstream list(f);
        std::string t;
        while (std::getline(list, t, ',')) {
            if (!t.empty()) {
                force.push_back(atoi(t.c_str()));
            }
        }
    }

    llama_backend_init();
    llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 1024;
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    const char * fa = getenv("FA");
    if (fa && fa[0] == '0') {
        cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    }
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "cannot create a context for %s\n", argv[1]);
        return 1;
    }
    if (argc > 4) {
        llama_adapter_lora * lora = llama_adapter_lora_init(model, argv[4]);
        if (!lora) {
            fprintf(stderr, "cannot load LoRA %s\n", argv[4]);
            return 1;
        }
        float scale = 1.0f;
        llama_set_adapters_lora(ctx, &lora, 1, &scale);
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);
    std::vector<llama_token> ids(prompt.size() + 8);
    const int n = llama_tokenize(vocab, prompt.c_str(), prompt.size(), ids.data(), ids.size(),
                                 /*add_special*/ false, /*parse_special*/ true);
    if (n < 0) {
        fprintf(stderr, "tokenization failed\n");
        return 1;
    }
    ids.resize(n);
    printf("{\"prompt\":[");
    for (int i = 0; i < n; i++) {
        printf("%s%d", i ? "," : "", ids[i]);
    }
    printf("]}\n");

    llama_batch batch = llama_batch_get_one(ids.data(), n);
    std::vector<llama_token> next(1);
    std::vector<int> order(n_vocab);
    for (int s = 0; s < steps; s++) {
        if (llama_decode(ctx, batch)) {
            fprintf(stderr, "decode failed at step %d\n", s);
            return 1;
        }
        const float * logits = llama_get_logits_ith(ctx, -1);
        for (int i = 0; i < n_vocab; i++) {
            order[i] = i;
        }
        std::partial_sort(order.begin(), order.begin() + 8, order.end(),
                          [&](int a, int b) { return logits[a] > logits[b]; });
        printf("{\"step\":%d,\"top\":[", s);
        for (int i = 0; i < 8; i++) {
            printf("%s[%d,%.9g]", i ? "," : "", order[i], logits[order[i]]);
        }
        printf("]}\n");
        next[0] = s < (int) force.size() ? force[s] : order[0];
        batch = llama_batch_get_one(next.data(), 1);
    }
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
