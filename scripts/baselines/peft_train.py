#!/usr/bin/env python3
"""Training throughput of PyTorch + PEFT on the GSM8K experiment's configuration, the baseline
that `loraga train`'s tokens/s is compared with (PERF.md).

The configuration of scripts/experiment/gsm8k.sh: SmolLM2-135M-Instruct from its GGUF (loaded by
transformers with gguf_file=, which dequantises and un-permutes Q/K; the tokenizer from the same
GGUF), GSM8K train, prompt "Question: <q>\\nAnswer: ", loss on the answer + EOS, max length 384
(truncated as loraga does), batch 16, AdamW (torch's fused implementation unless --adamw
foreach), 3% warmup then cosine, gradient clipping 1.0, and

  lora   PEFT LoRA r=8, alpha=16, no dropout, on q,k,v,o,gate,up,down_proj. Base model in bf16,
         frozen; the adapters in f32 (PEFT's autocast_adapter_dtype upcasts them); forward under
         torch.autocast(bf16). As loraga: frozen bf16 base, f32 trainable masters, bf16 products.
  full   every weight trainable, the model in f32 (masters) under torch.autocast(bf16). As loraga:
         f32 masters cast to bf16 for the products.

EOS is the GGUF's tokenizer.ggml.eos_token_id (<|im_end|>, id 2), as loraga uses, not the
<|im_start|> that transformers' GGUF tokenizer reports.

Batches: with --batch-plan (written by `loraga train ... --write-batch-plan FILE` with the run's
options), exactly loraga's micro-batches: the same records in the same order, right-padded to the
batch's longest example; the script checks that its token counts equal loraga's. Without one, its
own seeded shuffle with length bucketing like loraga's (same idea, other batches).

Timing: each step (batch upload, forward, backward, clipping, AdamW, schedule) is bracketed by
torch.cuda.synchronize() and time.perf_counter(); tokens/s counts non-padding tokens (prompt and
answer, as loraga's tokens/s does). The reported figure is the median over the steps after
--warmup-steps of tokens/step-time; the aggregate (tokens / time over the same steps) is given too.

With --eval-data (GSM8K test), after training: the token-weighted mean loss on the answers (+ EOS)
of its first --eval-examples records, as `loraga train --eval-data` reports it, so that a
300-step run on loraga's batches can be compared with loraga's run of the same configuration.

Output: one JSON object with a result per method (also written atomically to --out), e.g.

    PYTHONPATH=.cache/pylib python3 scripts/baselines/peft_train.py \\
        --data ../shared/data/gsm8k/train.jsonl --batch-plan runs/plan.json --out runs/peft_train.json

Needs torch, transformers, peft and the pure-Python gguf package (scripts/gpu-model.sh receive
installs it into .cache/pylib). No network.
"""
import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

TEMPLATE = "Question: {question}\nAnswer: "
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# loraga's defaults: LoRA-GA's estimation examples (32 batches of 4) are held apart for every method.
HELD_APART = 32 * 4


def write_atomically(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def gguf_eos(path: Path, tok) -> int:
    """The GGUF's own EOS id (what loraga appends), else <|im_end|>."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields["tokenizer.ggml.eos_token_id"]
        return int(field.parts[field.data[0]][0])
    except Exception as e:  # the reader is optional here: fall back to SmolLM2's EOS by name
        print(f"could not read tokenizer.ggml.eos_token_id ({e}); using <|im_end|>", file=sys.stderr)
        return tok.convert_tokens_to_ids("<|im_end|>")


def encode(records, tok, eos, max_len):
    """Per record (None where loraga drops it): (input_ids, prompt_len), as loraga's encode."""
    out = []
    for r in records:
        prompt = tok.encode(TEMPLATE.format(question=r["question"]), add_special_tokens=False)
        if len(prompt) >= max_len:
            out.append(None)
            continue
        ids = (prompt + tok.encode(r["answer"], add_special_tokens=False) + [eos])[:max_len]
        out.append((ids, len(prompt)))
    return out


def own_plan(examples, batch_size, steps, seed, chunk_batches=50):
    """Seeded shuffle with length bucketing (loraga's scheme, not its random stream)."""
    rng = random.Random(seed)
    usable = [i for i, e in enumerate(examples) if e is not None]
    rng.shuffle(usable)
    train = usable[HELD_APART:]
    if len(train) < batch_size:
        sys.exit(f"error: {len(train)} examples left after holding {HELD_APART} apart: no batch of {batch_size}")
    batches = []
    while len(batches) < steps:
        order = train[:]
        rng.shuffle(order)
        epoch = []
        for c in range(0, len(order), chunk_batches * batch_size):
            chunk = sorted(order[c : c + chunk_batches * batch_size], key=lambda i: -len(examples[i][0]))
            epoch += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
        epoch = [b for b in epoch if len(b) == batch_size]
        rng.shuffle(epoch)
        batches += epoch
    return batches[:steps]


def collate(examples, batch, pad_id, device):
    seq = max(len(examples[i][0]) for i in batch)
    ids, mask, labels = [], [], []
    for i in batch:
        e, p = examples[i]
        pad = seq - len(e)
        ids.append(e + [pad_id] * pad)
        mask.append([1] * len(e) + [0] * pad)
        labels.append([-100] * p + e[p:] + [-100] * pad)
    t = lambda x: torch.tensor(x, dtype=torch.long).to(device, non_blocking=True)
    return t(ids), t(mask), t(labels)


def build(method, args, gguf):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if method == "lora" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=dtype, attn_implementation=args.attn
    ).to("cuda")
    model.config.use_cache = False
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, bias="none",
                         target_modules=TARGETS, task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
        for n, p in model.named_parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()  # f32 masters whatever PEFT's default
    model.train()
    if args.compile:
        model = torch.compile(model, dynamic=True)
    return model


@torch.no_grad()
def evaluate(model, examples, pad_id, batch_size=16):
    """Token-weighted mean loss on the answer tokens (+ EOS), as `loraga train`'s eval loss."""
    model.eval()
    total, count = 0.0, 0
    for b in range(0, len(examples), batch_size):
        ids, mask, labels = collate(examples, range(b, min(b + batch_size, len(examples))), pad_id, "cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=mask).logits
        logits, labels = logits[:, :-1].float(), labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        total += loss.item()
        count += (labels != -100).sum().item()
    model.train()
    return total / count


def train(method, args, gguf, examples, plan, pad_id, eval_set):
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model = build(method, args, gguf)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - started
    trainable = [p for p in model.parameters() if p.requires_grad]
    lr = args.lr if args.lr is not None else (3e-4 if method == "lora" else 3e-5)
    impl = {"fused": True} if args.adamw == "fused" else {"foreach": True}
    opt = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, **impl)
    steps = len(plan)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(0.03 * steps), steps)
    torch.cuda.reset_peak_memory_stats()
    times, tokens, losses = [], [], []
    for step, batch in enumerate(plan):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ids, mask, labels = collate(examples, batch, pad_id, "cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        tokens.append(sum(len(examples[i][0]) for i in batch))
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            print(f"{method} step {step + 1}/{steps}: loss {losses[-1]:.4f}, {tokens[-1] / times[-1]:.0f} tok/s",
                  file=sys.stderr)
    eval_loss = evaluate(model, eval_set, pad_id) if eval_set else None
    w = min(args.warmup_steps, steps - 1)
    rates = [n / t for n, t in zip(tokens[w:], times[w:])]
    result = dict(
        method=method,
        steps=steps,
        warmup_steps_excluded=w,
        tokens_per_s_median=statistics.median(rates),
        tokens_per_s_aggregate=sum(tokens[w:]) / sum(times[w:]),
        step_s_median=statistics.median(times[w:]),
        first_step_s=times[0],
        steps_s_total=sum(times),
        load_s=load_s,
        lr=lr,
        trainable_params=sum(p.numel() for p in trainable),
        trainable_dtype=str(trainable[0].dtype),
        peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30,
        eval_loss=eval_loss,
        losses=losses,
        step_s=times,
        tokens=tokens,
    )
    del model, opt
    torch.cuda.empty_cache()
    return result


def main():
    root = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=root / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--data", type=Path, default=root / "../shared/data/gsm8k/train.jsonl",
                    help="GSM8K train JSONL (question, answer)")
    ap.add_argument("--method", nargs="+", choices=["lora", "full"], default=["lora", "full"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the medians")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=384)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--lr", type=float, default=None, help="default 3e-4 for lora, 3e-5 for full")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-plan", type=Path, help="loraga train --write-batch-plan's JSON: its batches")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--adamw", default="fused", choices=["fused", "foreach"])
    ap.add_argument("--compile", action="store_true", help="torch.compile(model, dynamic=True)")
    ap.add_argument("--eval-data", type=Path, help="after training, the eval loss on this JSONL's first "
                    "--eval-examples records (GSM8K test), as loraga train --eval-data computes it")
    ap.add_argument("--eval-examples", type=int, default=256)
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: peft_train.py measures GPU throughput and needs CUDA; torch sees no GPU")

    import peft
    import transformers
    from transformers import AutoTokenizer

    gguf = args.gguf.resolve()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    eos = gguf_eos(gguf, tok)
    records = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    examples = encode(records, tok, eos, args.max_len)
    tokenize_s = time.perf_counter() - t0

    mismatches = 0
    if args.batch_plan:
        plan_json = json.loads(args.batch_plan.read_text())
        for key, ours in [("batch_size", args.batch_size), ("max_len", args.max_len)]:
            if plan_json[key] != ours:
                print(f"note: the plan's {key} is {plan_json[key]} (--{key.replace('_', '-')} {ours} ignored)",
                      file=sys.stderr)
        if plan_json.get("grad_accum", 1) != 1:
            print("note: the plan has grad_accum > 1; each micro-batch is timed as a step here", file=sys.stderr)
        plan = plan_json["records"][: args.steps]
        for batch, lengths in zip(plan, plan_json["lengths"]):
            for i, n in zip(batch, lengths):
                if examples[i] is None or len(examples[i][0]) != n:
                    mismatches += 1
        if mismatches:
            print(f"warning: {mismatches} examples of the plan tokenize to other lengths here than in loraga",
                  file=sys.stderr)
        if any(examples[i] is None for b in plan for i in b):
            sys.exit("error: the plan uses records this script drops (prompt longer than --max-len)")
    else:
        plan = own_plan(examples, args.batch_size, args.steps, args.seed)

    eval_set = None
    if args.eval_data:
        lines = [line for line in args.eval_data.read_text().splitlines() if line.strip()][: args.eval_examples]
        eval_set = [e for e in encode([json.loads(line) for line in lines], tok, eos, args.max_len) if e is not None]
    results = [train(m, args, gguf, examples, plan, eos, eval_set) for m in args.method]
    out = dict(
        torch=torch.__version__,
        transformers=transformers.__version__,
        peft=peft.__version__,
        device=torch.cuda.get_device_name(),
        gguf=gguf.name,
        data=str(args.data),
        batch_plan=str(args.batch_plan) if args.batch_plan else None,
        plan_length_mismatches=mismatches,
        batch_size=len(plan[0]),
        max_len=args.max_len,
        eos_token_id=eos,
        attn=args.attn,
        adamw=args.adamw,
        compile=args.compile,
        autocast="bf16",
        tokenize_s=tokenize_s,
        results=results,
    )
    text = json.dumps(out, indent=1) + "\n"
    if args.out:
        write_atomically(args.out, text)
    summary = {r["method"]: round(r["tokens_per_s_median"]) for r in results}
    print(f"tokens/s (median after {args.warmup_steps} warm-up steps): {summary}", file=sys.stderr)
    print(text)


if __name__ == "__main__":
    main()
