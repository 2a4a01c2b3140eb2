"""Perturbation sizes as the papers write them: 8/255 for eps = 0.0313725..."""

from __future__ import annotations

__all__ = ["parse_eps", "eps_label"]


def parse_eps(text: str) -> float:
    """'8/255' or '0.03' -> the float; ValueError (one line) for anything else."""
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"expected a number or a fraction like 8/255, got {text!r}") from None


def eps_label(eps: str | float) -> str:
    """How reports write an eps: '8/255' where 0 < eps < 1 and 255 eps is a whole number (to 1e-3),
    else the plain number ('0.1', not '25.5/255'; '1'). ``parse_eps`` reads both back."""
    e = parse_eps(eps) if isinstance(eps, str) else float(eps)
    scaled = e * 255
    return f"{round(scaled):d}/255" if 0 < e < 1 and abs(scaled - round(scaled)) < 1e-3 else f"{e:g}"
