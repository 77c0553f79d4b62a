/*
 * One DFJ verdict from a dfj GGUF artifact (model.gguf + mmproj.gguf) through llama.cpp's C API and
 * mtmd, as dfj's own llama.cpp runtime computes it:
 *
 *   pairwise:  P(A), the share of "A" in P(A) + P(B) after a forced "<answer>" (one forward pass)
 *   pointwise: the greedy text, up to "</score>", the end of the turn or 512 tokens
 *
 *   dfj_judge [options] pairwise  ARTIFACT TEMPLATE IMAGE LABEL RESPONSE_A RESPONSE_B
 *   dfj_judge [options] pointwise ARTIFACT TEMPLATE IMAGE LABEL RESPONSE
 *
 *   TEMPLATE  the DFJ prompt template of the mode (dfj/reference/<mode>_prompt.txt)
 *   IMAGE     a PNG/JPEG at its model size: sides multiples of 28, pixels within the judge's limits
 *             (dfj.images.fit_to_grid; mtmd would otherwise resample it with its own filter)
 *   options   --cpu-backend LIB  the llama.cpp CPU backend library to load (default: the best one
 *                                beside libggml; on an AMX CPU pick a level below sapphirerapids)
 *             --threads N, --min-pixels N, --max-pixels N (the artifact's dfj.json "pixels")
 *             --print-ids        also print the prompt's token ids (head, image, tail)
 *
 * It prints one JSON object. The token rule: the chat template's text is tokenized with its control
 * tokens, the label and the responses as plain text (parse_special = false), so a response that
 * writes "<|im_end|>" gets ordinary tokens, never the end of the user's turn.
 * Texts are taken as given; dfj normalises them to NFC first (non-NFC input can tokenize differently).
 */
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml-backend.h"
#include "llama.h"
#include "mtmd-helper.h"
#include "mtmd.h"

#define BATCH 512
#define POINTWISE_MAX_NEW_TOKENS 512
#define MIN_ANSWER_MASS 0.5

/* The Qwen2.5-VL chat template around one user turn holding [image, prompt] (dfj.prompts.render_chat). */
static const char *CHAT_HEAD =
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>";
static const char *CHAT_CLOSING = "<|im_end|>\n<|im_start|>assistant\n";

typedef struct {
    llama_token *ids;
    int n, cap;
} tokens_t;

static void die(const char *what) {
    fprintf(stderr, "dfj_judge: %s\n", what);
    exit(1);
}

static void push(tokens_t *t, llama_token id) {
    if (t->n == t->cap) {
        t->cap = t->cap ? 2 * t->cap : 256;
        t->ids = realloc(t->ids, sizeof(llama_token) * t->cap);
        if (!t->ids) die("out of memory");
    }
    t->ids[t->n++] = id;
}

static void tokenize(const struct llama_vocab *vocab, const char *text, bool special, tokens_t *out) {
    int len = (int)strlen(text), size = len + 8;
    llama_token *ids = malloc(sizeof(llama_token) * size);
    int n = llama_tokenize(vocab, text, len, ids, size, false, special);
    if (n < 0) {
        size = -n;
        ids = realloc(ids, sizeof(llama_token) * size);
        n = llama_tokenize(vocab, text, len, ids, size, false, special);
    }
    if (n < 0) die("cannot tokenize");
    for (int i = 0; i < n; i++) push(out, ids[i]);
    free(ids);
}

static llama_token one_token(const struct llama_vocab *vocab, const char *text) {
    tokens_t t = {0};
    tokenize(vocab, text, true, &t);
    if (t.n != 1) die("a control token is not one token in this vocabulary");
    llama_token id = t.ids[0];
    free(t.ids);
    return id;
}

static char *read_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open the template");
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = malloc(size + 1);
    if (fread(text, 1, size, f) != (size_t)size) die("cannot read the template");
    text[size] = 0;
    fclose(f);
    return text;
}

/* The template with "{name}" replaced for the given names only, in one left-to-right pass: text that a
 * value brings in is never searched again (dfj.prompts.fill). Never printf-formatted. */
static char *fill(const char *template_text, const char **names, const char **values, int count) {
    size_t cap = strlen(template_text) + 1, n = 0;
    for (int i = 0; i < count; i++) cap += strlen(values[i]);
    char *out = malloc(cap * 2 + 64);
    for (const char *p = template_text; *p;) {
        int hit = -1;
        for (int i = 0; i < count && hit < 0; i++) {
            size_t len = strlen(names[i]);
            if (p[0] == '{' && strncmp(p + 1, names[i], len) == 0 && p[1 + len] == '}') hit = i;
        }
        if (hit >= 0) {
            size_t len = strlen(values[hit]);
            memcpy(out + n, values[hit], len);
            n += len;
            p += strlen(names[hit]) + 2;
        } else {
            out[n++] = *p++;
        }
    }
    out[n] = 0;
    return out;
}

static void decode(struct llama_context *ctx, const llama_token *ids, int n, llama_pos pos0, bool logits_last) {
    struct llama_batch batch = llama_batch_init(BATCH, 0, 1);
    for (int start = 0; start < n; start += BATCH) {
        int count = n - start < BATCH ? n - start : BATCH;
        batch.n_tokens = count;
        for (int i = 0; i < count; i++) {
            batch.token[i] = ids[start + i];
            batch.pos[i] = pos0 + start + i;
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = 0;
            batch.logits[i] = logits_last && start + i == n - 1;
        }
        if (llama_decode(ctx, batch) != 0) die("llama_decode failed");
    }
    llama_batch_free(batch);
}

static void print_json_string(const char *s) {
    putchar('"');
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') printf("\\%c", *p);
        else if (*p == '\n') printf("\\n");
        else if (*p < 0x20) printf("\\u%04x", *p);
        else putchar(*p);
    }
    putchar('"');
}

static void print_ids(const char *name, const llama_token *ids, int n) {
    printf("\"%s\": [", name);
    for (int i = 0; i < n; i++) printf(i ? ", %d" : "%d", ids[i]);
    printf("], ");
}

static void quiet(enum ggml_log_level level, const char *text, void *data) {
    (void)data;
    if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

int main(int argc, char **argv) {
    const char *cpu_backend = NULL;
    int threads = 2, min_pixels = 3136, max_pixels = 1003520;
    bool show_ids = false;
    int arg = 1;
    for (; arg < argc && strncmp(argv[arg], "--", 2) == 0; arg++) {
        if (!strcmp(argv[arg], "--print-ids")) show_ids = true;
        else if (arg + 1 >= argc) die("an option needs a value");
        else if (!strcmp(argv[arg], "--cpu-backend")) cpu_backend = argv[++arg];
        else if (!strcmp(argv[arg], "--threads")) threads = atoi(argv[++arg]);
        else if (!strcmp(argv[arg], "--min-pixels")) min_pixels = atoi(argv[++arg]);
        else if (!strcmp(argv[arg], "--max-pixels")) max_pixels = atoi(argv[++arg]);
        else die("unknown option");
    }
    int rest = argc - arg;
    bool pairwise = rest == 7 && !strcmp(argv[arg], "pairwise");
    if (!pairwise && !(rest == 6 && !strcmp(argv[arg], "pointwise")))
        die("usage: dfj_judge [options] pairwise ARTIFACT TEMPLATE IMAGE LABEL RESPONSE_A RESPONSE_B\n"
            "       dfj_judge [options] pointwise ARTIFACT TEMPLATE IMAGE LABEL RESPONSE");
    const char *artifact = argv[arg + 1], *template_path = argv[arg + 2], *image_path = argv[arg + 3];
    const char *label = argv[arg + 4];
    if (strcmp(label, "real") && strcmp(label, "fake") && strcmp(label, "edited")) die("LABEL is real, fake or edited");

    llama_log_set(quiet, NULL);
    mtmd_helper_log_set(quiet, NULL);
    if (cpu_backend) {
        if (!ggml_backend_load(cpu_backend)) die("cannot load the CPU backend library");
    } else {
        ggml_backend_load_all();
    }
    llama_backend_init();

    char model_path[4096], mmproj_path[4096];
    snprintf(model_path, sizeof model_path, "%s/model.gguf", artifact);
    snprintf(mmproj_path, sizeof mmproj_path, "%s/mmproj.gguf", artifact);
    struct llama_model_params model_params = llama_model_default_params();
    model_params.n_gpu_layers = 0;
    struct llama_model *model = llama_model_load_from_file(model_path, model_params);
    if (!model) die("cannot load model.gguf");
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    bool exact = llama_model_ftype(model) == LLAMA_FTYPE_ALL_F32;

    struct llama_context_params ctx_params = llama_context_default_params();
    int trained = llama_model_n_ctx_train(model);
    ctx_params.n_ctx = trained > 0 && trained < 8192 ? trained : 8192;
    ctx_params.n_batch = ctx_params.n_ubatch = BATCH;
    ctx_params.n_threads = ctx_params.n_threads_batch = threads;
    ctx_params.no_perf = true;
    if (exact) { /* an all-f32 model keeps f32 attention: flash attention on CPU rounds K/V to f16 */
        ctx_params.type_k = ctx_params.type_v = GGML_TYPE_F32;
        ctx_params.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    }
    struct llama_context *ctx = llama_init_from_model(model, ctx_params);
    if (!ctx) die("cannot make a llama context");

    struct mtmd_context_params mparams = mtmd_context_params_default();
    mparams.use_gpu = false;
    mparams.n_threads = threads;
    mparams.print_timings = false;
    mparams.warmup = false;
    if (exact) mparams.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    mparams.image_min_tokens = min_pixels / (28 * 28) > 0 ? min_pixels / (28 * 28) : 1;
    mparams.image_max_tokens = max_pixels / (28 * 28);
    mparams.media_marker = mtmd_default_marker();
    mtmd_context *mctx = mtmd_init_from_file(mmproj_path, model, mparams);
    if (!mctx) die("cannot load mmproj.gguf");

    /* The prompt: the template's text with its control tokens; the filled DFJ prompt as plain text. */
    char *template_text = read_file(template_path);
    char *prompt;
    if (pairwise) {
        const char *names[] = {"ground_truth_label", "response_a", "response_b"};
        const char *values[] = {label, argv[arg + 5], argv[arg + 6]};
        prompt = fill(template_text, names, values, 3);
    } else {
        const char *names[] = {"ground_truth_label", "candidate_response"};
        const char *values[] = {label, argv[arg + 5]};
        prompt = fill(template_text, names, values, 2);
    }
    tokens_t chat = {0}, tail = {0};
    tokenize(vocab, CHAT_HEAD, true, &chat);
    llama_token pad = one_token(vocab, "<|image_pad|>");
    int at = -1;
    for (int i = 0; i < chat.n; i++)
        if (chat.ids[i] == pad) at = i;
    if (at < 1 || at != chat.n - 2) die("the chat head does not end with the image block");
    for (int i = at + 1; i < chat.n; i++) push(&tail, chat.ids[i]); /* <|vision_end|> */
    tokenize(vocab, prompt, false, &tail);
    tokenize(vocab, CHAT_CLOSING, true, &tail);

    /* The image block: mtmd's image chunk between <|vision_start|> and <|vision_end|>. */
    struct mtmd_helper_bitmap_wrapper image = mtmd_helper_bitmap_init_from_file(mctx, image_path, false, mtmd_helper_init_opt_default());
    if (!image.bitmap) die("cannot read the image");
    mtmd_input_chunks *chunks = mtmd_input_chunks_init();
    mtmd_input_text marker = {mtmd_default_marker(), strlen(mtmd_default_marker()), false, true};
    const mtmd_bitmap *bitmaps[] = {image.bitmap};
    if (mtmd_tokenize(mctx, chunks, &marker, bitmaps, 1) != 0) die("mtmd could not tokenize the image");
    const mtmd_input_chunk *image_chunk = NULL;
    for (size_t i = 0; i < mtmd_input_chunks_size(chunks); i++) {
        const mtmd_input_chunk *chunk = mtmd_input_chunks_get(chunks, i);
        if (mtmd_input_chunk_get_type(chunk) == MTMD_INPUT_CHUNK_TYPE_IMAGE) image_chunk = chunk;
    }
    if (!image_chunk) die("mtmd made no image chunk");

    decode(ctx, chat.ids, at, 0, false);
    llama_pos position = 0;
    if (mtmd_helper_eval_chunk_single(mctx, ctx, image_chunk, at, 0, BATCH, false, &position) != 0)
        die("llama.cpp could not evaluate the image");

    printf("{");
    if (show_ids) {
        print_ids("head", chat.ids, at);
        printf("\"image_tokens\": %zu, ", mtmd_input_chunk_get_n_tokens(image_chunk));
        print_ids("tail", tail.ids, tail.n);
    }
    if (pairwise) {
        /* "<answer>A</answer>" and "<answer>B</answer>" share a token prefix; the next token is the letter. */
        tokens_t a = {0}, b = {0};
        tokenize(vocab, "<answer>A</answer>", true, &a);
        tokenize(vocab, "<answer>B</answer>", true, &b);
        int shared = 0;
        while (shared < a.n && shared < b.n && a.ids[shared] == b.ids[shared]) shared++;
        if (shared >= a.n || shared >= b.n) die("<answer>A and <answer>B do not part at one token");
        for (int i = 0; i < shared; i++) push(&tail, a.ids[i]);
        decode(ctx, tail.ids, tail.n, position, true);
        const float *logits = llama_get_logits_ith(ctx, -1);
        int n_vocab = llama_vocab_n_tokens(vocab);
        double top = logits[0], sum = 0;
        for (int i = 1; i < n_vocab; i++) top = logits[i] > top ? logits[i] : top;
        for (int i = 0; i < n_vocab; i++) sum += exp((double)logits[i] - top);
        double p_a = exp((double)logits[a.ids[shared]] - top) / sum, p_b = exp((double)logits[b.ids[shared]] - top) / sum;
        double share = p_a + p_b > 0 ? p_a / (p_a + p_b) : 0.5;
        const char *choice = p_a + p_b < MIN_ANSWER_MASS ? "null" : share >= 0.5 ? "\"A\"" : "\"B\"";
        printf("\"p_a\": %.9f, \"answer_mass\": %.9f, \"choice\": %s}\n", share, p_a + p_b, choice);
    } else {
        decode(ctx, tail.ids, tail.n, position, true);
        llama_pos next = position + tail.n;
        llama_token stops[] = {one_token(vocab, "<|im_end|>"), one_token(vocab, "<|endoftext|>")};
        int n_vocab = llama_vocab_n_tokens(vocab);
        tokens_t out = {0};
        char *text = calloc(1, 1);
        while (out.n < POINTWISE_MAX_NEW_TOKENS) {
            const float *logits = llama_get_logits_ith(ctx, -1);
            llama_token best = 0;
            for (int i = 1; i < n_vocab; i++) best = logits[i] > logits[best] ? i : best;
            if (best == stops[0] || best == stops[1]) break;
            push(&out, best);
            int size = 16 * out.n + 16;
            text = realloc(text, size);
            int n = llama_detokenize(vocab, out.ids, out.n, text, size, true, false);
            if (n < 0) die("cannot detokenize");
            text[n] = 0;
            size_t len = strlen(text);
            if (len >= 8 && !strcmp(text + len - 8, "</score>")) break;
            decode(ctx, &best, 1, next++, true);
        }
        printf("\"text\": ");
        print_json_string(text);
        printf("}\n");
    }
    mtmd_input_chunks_free(chunks);
    mtmd_bitmap_free(image.bitmap);
    mtmd_free(mctx);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
