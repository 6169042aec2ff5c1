"""The BPE encodings budgetkit counts with, built from files shipped in ``pricing/data/``.

cl100k_base (gpt-4, gpt-3.5, embeddings, and the estimate for other providers) and o200k_base
(gpt-4o, 4.1, o-series, gpt-5) are package data, so a core-only install counts tokens with no
network. They are read straight from the package: no ``TIKTOKEN_CACHE_DIR`` (tiktoken reads
its cache directory from the process environment, which is not ours to change), no copy
written to tiktoken's temporary cache (``tiktoken.load.load_tiktoken_bpe`` does that for any
path), and no search for another package's copy.

The pattern and special tokens are those ``tiktoken_ext.openai_public`` defines for each
encoding (tests/test_tokens.py checks they still agree with the installed tiktoken). Other
encodings a catalog may name (r50k_base, p50k_base, gpt2) are not bundled: tiktoken loads
them its own way, and a failure (offline, say) is a ConfigurationError naming the encoding.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

from budgetkit.errors import ConfigurationError

if TYPE_CHECKING:
    import tiktoken

__all__ = ["BUNDLED_ENCODINGS", "load_encoding"]

_ENDOFTEXT = "<|endoftext|>"
_FIM_PREFIX = "<|fim_prefix|>"
_FIM_MIDDLE = "<|fim_middle|>"
_FIM_SUFFIX = "<|fim_suffix|>"
_ENDOFPROMPT = "<|endofprompt|>"


@dataclass(frozen=True)
class _BundledEncoding:
    file: str
    sha256: str  # the hash tiktoken_ext.openai_public expects for the same file
    pat_str: str
    special_tokens: dict[str, int]


_CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

BUNDLED_ENCODINGS: dict[str, _BundledEncoding] = {
    "cl100k_base": _BundledEncoding(
        file="cl100k_base.tiktoken",
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        pat_str=_CL100K_PATTERN,
        special_tokens={_ENDOFTEXT: 100257, _FIM_PREFIX: 100258, _FIM_MIDDLE: 100259,
                        _FIM_SUFFIX: 100260, _ENDOFPROMPT: 100276},
    ),
    "o200k_base": _BundledEncoding(
        file="o200k_base.tiktoken",
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        pat_str=_O200K_PATTERN,
        special_tokens={_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018},
    ),
}


def _mergeable_ranks(bundled: _BundledEncoding) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file (one ``base64(token) rank`` pair a line), hash-checked."""
    data = (resources.files("budgetkit.pricing") / "data" / bundled.file).read_bytes()
    if hashlib.sha256(data).hexdigest() != bundled.sha256:
        raise ConfigurationError(
            f"the bundled BPE file budgetkit/pricing/data/{bundled.file} is damaged (its "
            "SHA-256 differs from the one tiktoken publishes); reinstall budgetkit")
    fields = data.split()
    if len(fields) % 2:
        raise ConfigurationError(f"budgetkit/pricing/data/{bundled.file}: a line lacks its rank")
    return dict(zip(map(base64.b64decode, fields[0::2]), map(int, fields[1::2]), strict=True))


def load_encoding(name: str) -> tiktoken.Encoding:
    """Build the tiktoken encoding ``name``: from the bundled file when budgetkit ships it,
    else through tiktoken's own loader (which may download)."""
    import tiktoken

    bundled = BUNDLED_ENCODINGS.get(name)
    if bundled is not None:
        return tiktoken.Encoding(name, pat_str=bundled.pat_str,
                                 mergeable_ranks=_mergeable_ranks(bundled),
                                 special_tokens=dict(bundled.special_tokens))
    try:
        return tiktoken.get_encoding(name)
    except (ValueError, OSError) as exc:  # unknown name; no network (requests' errors are OSErrors)
        raise ConfigurationError(
            f"tokenizer {name!r} is not bundled with budgetkit (only "
            f"{', '.join(BUNDLED_ENCODINGS)} are) and tiktoken could not load it: {exc}"
        ) from exc
