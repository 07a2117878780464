"""rope's host instructions: gk.apply_rotary_pos_emb forward+backward (Llama's halves; at HEAD
the interleaved form too) against transformers' formula. Imports inside cases(): the setup
file's frame (a Path filename) must not be on the stack while torch and gpukernels import."""

import __main__


def cases():
    import torch

    import gpukernels as gk

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    q, k = torch.randn(1, 4, 8, 16, requires_grad=True), torch.randn(1, 2, 8, 16, requires_grad=True)
    cos, sin = torch.randn(1, 8, 16), torch.randn(1, 8, 16)

    def pytorch():
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        (q * c + rotate_half(q) * s).sum().backward()
        (k * c + rotate_half(k) * s).sum().backward()

    def ours(**kwargs):
        def run():
            a, b = gk.apply_rotary_pos_emb(q, k, cos, sin, **kwargs)
            (a.sum() + b.sum()).backward()

        return run

    rows = {"halves, whole heads": (ours(), pytorch)}
    if "interleaved" in gk.apply_rotary_pos_emb.__code__.co_varnames:
        rows["interleaved"] = (ours(interleaved=True), pytorch)
    return rows


__main__.CASES["gated_act"] = cases  # counted under the name gated_act: --ops knows only its own
