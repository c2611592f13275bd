"""The hidden "true" reward of chapter 03: how warm, wordy and well-formed a continuation is.

RLHF needs a human to say which of two answers is better. We replace the human with a program we can query as often as
we like, so every claim in the chapter is measurable: the reward model only ever sees *pairs labelled* by this function,
and the policy (PPO, DPO, GRPO, RLOO) never sees it at all — except where we use it on purpose as a "verifiable reward".

    from ch03.true_reward import true_reward
    true_reward(["O sweet and gentle love, be merry", "death death death"])  # tensor([ 2.5, -4.3])

Score of one continuation (its final word is dropped when the text cuts it in half):
    + number of *distinct* positive words (love, sweet, fair, ...), capped at ``MAX_POSITIVE``
    − number of negative words (death, blood, villain, ...)
    − 2 · (fraction of words that are not real Shakespeare words)   # gibberish is punished
    − 2 · (fraction of repeated words)                              # "love love love" is punished
    − 0.25 · (words outside the band [MIN_WORDS, MAX_WORDS])        # "lovelovelove" or "a a a a" are punished
It is not trivially gameable: a policy has to write *varied, real* words, so the cheap exploits a learned reward model
might fall for (repeating its favourite token, inventing letter soup around "love") score badly here — that gap is what
shows reward hacking in ppo.py. Run ``python 03_rlhf/true_reward.py`` for a few scored examples.
Reference: the programmatic-reward setup follows Ziegler et al. 2019 (positive-sentiment continuation task) and
Gao et al. 2022 (a "gold" reward to measure over-optimisation of a proxy reward model).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import torch

from common.cli import base_parser

POSITIVE = frozenset(
    "love loved loves loving lovely sweet sweetest fair fairest gentle noble happy happiness joy joyful grace gracious "
    "honour honest kind kindness dear dearest blessed bless true heaven peace hope friend friends merry glad bright best "
    "smile thanks praise faith rich fortune delight pleasure beauty beautiful worthy virtue good".split()
)
NEGATIVE = frozenset(
    "hate hateful death dead die dies kill killed blood bloody grief woe curse cursed fear tears traitor villain poison "
    "war sorrow foul false vile plague murder wretch wretched shame evil damned despair".split()
)
MAX_POSITIVE = 4
MIN_WORDS, MAX_WORDS = 5, 12
WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)?")


@lru_cache(maxsize=1)
def dictionary(min_count: int = 3) -> frozenset[str]:
    """Real words = words used at least ``min_count`` times in tiny-shakespeare (≈5k words)."""
    from common.data import load_shakespeare

    counts = Counter(WORD_RE.findall(load_shakespeare().lower()))
    return frozenset(w for w, c in counts.items() if c >= min_count)


def words_of(text: str) -> list[str]:
    """Lower-cased words; a word cut off at the end of the text is dropped (it is not the policy's fault)."""
    words = WORD_RE.findall(text.lower())
    if words and text and text[-1].isalpha():
        words = words[:-1]
    return words


def score_text(text: str) -> dict[str, float]:
    """The reward and its parts, for one continuation."""
    words = words_of(text)
    n = len(words)
    vocab = dictionary()
    if n == 0:
        return {
            "reward": -2.0 - 0.25 * MIN_WORDS,
            "positive": 0,
            "negative": 0,
            "real": 0.0,
            "distinct": 0.0,
            "n_words": 0,
        }
    positive = min(len({w for w in words if w in POSITIVE}), MAX_POSITIVE)
    negative = sum(w in NEGATIVE for w in words)
    real = sum(w in vocab for w in words) / n
    distinct = len(set(words)) / n
    band = max(0, MIN_WORDS - n) + max(0, n - MAX_WORDS)
    reward = positive - negative - 2 * (1 - real) - 2 * (1 - distinct) - 0.25 * band
    return {
        "reward": reward,
        "positive": positive,
        "negative": negative,
        "real": real,
        "distinct": distinct,
        "n_words": n,
    }


def true_reward(texts: Sequence[str]) -> torch.Tensor:
    """(N,) float32 rewards for N continuations (prompts excluded)."""
    return torch.tensor([score_text(t)["reward"] for t in texts], dtype=torch.float32)


def main(argv=None):
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("texts", nargs="*", help="continuations to score (default: a few examples)")
    args = p.parse_args(argv)
    texts = args.texts or [
        " O sweet and gentle love, be merry and kind to me.",
        " I will not speak with him, my lord, for he is\n",
        " death and blood, thou villain, thou art a traitor",
        " love love love love love love love love love lo",
        " lovelyswee tlovefai rgoodgentl ejoyhapp ynoble",
        " Wheng thour haste moth the sarrow ofe thime an",
    ]
    rows = [{"text": repr(t), **score_text(t)} for t in texts]
    from common.bench import markdown_table

    print(markdown_table(rows, ["text", "reward", "positive", "negative", "real", "distinct", "n_words"], ".2f"))
    return rows


if __name__ == "__main__":
    main()
