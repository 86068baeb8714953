"""
Ask a model a question about one or more images; the answer streams to stdout, timings go to stderr.
    python sample.py --init_from Qwen/Qwen2-VL-2B-Instruct --image photo.jpg --prompt "What is in this image?"
"""
import argparse
import sys
import time

import torch

import data
import model as M


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init_from", default="Qwen/Qwen2-VL-2B-Instruct", help="checkpoint directory or Hub id")
    p.add_argument("--image", action="append", default=[], help="image path; repeat for several images")
    p.add_argument("--prompt", default="Describe this image.")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bfloat16 on cuda, float32 on cpu")
    return p.parse_args(argv)


class Streamer:
    """Prints the decoded text as it grows. Decodes the whole answer each time and prints the new suffix, holding
    back a trailing partial UTF-8 character (byte-level BPE can split one across tokens)."""

    def __init__(self, tok, out=sys.stdout):
        self.tok, self.out, self.ids, self.printed = tok, out, [], 0

    def put(self, token_id):
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    path = M.resolve_dir(args.init_from)
    tok = data.Tokenizer(path)
    model = M.from_pretrained(path, dtype=dtype, device=args.device)

    images = [data.load_image(p) for p in args.image]
    pixel_values, grid = data.process_images(images, data.ImageConfig.from_dir(path))
    content = data.IMAGE_PLACEHOLDER * len(images) + args.prompt
    ids, _ = data.encode_chat(tok, [{"role": "user", "content": content}], grid, add_generation_prompt=True)
    ids = torch.tensor([ids], device=args.device)
    if pixel_values is not None:
        pixel_values, grid = pixel_values.to(args.device), grid.to(args.device)

    stop = {tok.im_end_id, tok.endoftext_id}
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    streamer = Streamer(tok)
    t0 = time.perf_counter()
    times = []  # arrival time of each token: the first comes right after the prefill, the rest one decode step each
    for nxt in M.generate(model, ids, None, pixel_values, grid, args.max_new_tokens, args.temperature, args.top_k,
                          args.top_p, stop_ids=stop, generator=gen):
        times.append(time.perf_counter())
        if nxt.item() in stop:
            break
        streamer.put(nxt.item())
    print()
    steps = len(times) - 1
    rate = f"{steps / (times[-1] - times[0]):.1f} tokens/s" if steps else "n/a"
    print(f"prefill: {ids.size(1)} tokens in {times[0] - t0:.3f} s; decode: {steps} steps at {rate}", file=sys.stderr)
    return streamer.ids


if __name__ == "__main__":
    main()
