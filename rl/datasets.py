"""Training data from the feedback log: a snapshot of the DB, split by conversation.

    snap = load_snapshot(store, cutoff=run.data_cutoff)
    sft = build_sft_data(snap, SFTDataOptions(min_score=0.5))          # rated-well replies
    prefs = build_preference_data(snap, PreferenceOptions(ties="drop"))   # chosen / rejected
    log.info("%s", prefs.summary.format())

Everything reads one snapshot: the rows created at or before a cut-off time, so a job (and its
resumption) trains on exactly the data it started with. Rows are split **by conversation**
with the split stored in the database (`agent.store.splits`: train / validation / judge /
test, decided once per conversation), so every stage sees the same split and no held-out
conversation ever contributes a training row. Rows come out in TRL's conversational formats:
SFT as prompt-completion ({"prompt": [...messages], "completion": [{"role": "assistant", ...}]},
so the loss falls on the rated reply only), preferences as {"prompt": [...], "chosen": [...],
"rejected": [...], "margin": float}.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from agent.errors import ValidationError
from agent.store.api import SOURCES, Store
from agent.store.models import Comparison, Conversation, Message, Rating
from agent.store.splits import SPLITS, SplitFractions, assign_splits

log = logging.getLogger(__name__)

Chat = list[dict[str, str]]
SFT_SIGNALS = ("thumb", "likert", "comparison")
TIE_POLICIES = ("drop", "equal")


# ---- snapshot and split ------------------------------------------------------------------


@dataclass
class Snapshot:
    """The rows of the feedback log created at or before `cutoff`."""

    cutoff: datetime
    conversations: dict[int, Conversation]
    messages: dict[int, Message]
    ratings: list[Rating]
    comparisons: list[Comparison]
    splits: dict[int, str] = field(default_factory=dict)
    """Each conversation's stored split (train / validation / judge / test)."""

    def split_of(self, conversation_id: int) -> str:
        """The stored split of a conversation of the snapshot."""
        return self.splits[conversation_id]

    def context(self, message_id: int) -> Chat:
        """The chat before `message_id`: system prompt, then its branch (failed replies left out)."""
        chain: list[Message] = []
        parent_id = self.messages[message_id].parent_id
        while parent_id is not None and parent_id in self.messages:
            chain.append(self.messages[parent_id])
            parent_id = self.messages[parent_id].parent_id
        conv = self.conversations[self.messages[message_id].conversation_id]
        chat = [{"role": "system", "content": conv.system_prompt}] if conv.system_prompt else []
        return chat + [{"role": m.role, "content": m.content} for m in chain[::-1] if not m.error]


def load_snapshot(
    store: Store,
    cutoff: datetime,
    fractions: SplitFractions | None = None,
    sources: list[str] | None = None,
) -> Snapshot:
    """Conversations (of `sources` only, when given), messages, ratings and comparisons created
    at or before `cutoff`, with each conversation's stored split (drawn with `fractions` and
    stored for new ones)."""
    query = select(Conversation).where(Conversation.created_at <= cutoff)
    if sources:
        unknown = sorted(set(sources) - set(SOURCES))
        if unknown:
            raise ValidationError(f"sources: {unknown} are not among {', '.join(SOURCES)}")
        query = query.where(Conversation.source.in_(sources))
    with store.reading() as s:
        convs = s.scalars(query)
        msgs = s.scalars(select(Message).where(Message.created_at <= cutoff).order_by(Message.id))
        ratings = s.scalars(select(Rating).where(Rating.created_at <= cutoff).order_by(Rating.id))
        comps = s.scalars(
            select(Comparison).where(Comparison.created_at <= cutoff).order_by(Comparison.id)
        )
        snap = Snapshot(
            cutoff=cutoff,
            conversations={c.id: c for c in convs},
            messages={m.id: m for m in msgs},
            ratings=list(ratings),
            comparisons=list(comps),
        )
    snap.messages = {
        k: m for k, m in snap.messages.items() if m.conversation_id in snap.conversations
    }
    snap.ratings = [r for r in snap.ratings if r.message_id in snap.messages]
    snap.comparisons = [
        c for c in snap.comparisons if {c.message_a_id, c.message_b_id} <= snap.messages.keys()
    ]
    snap.splits = assign_splits(store, snap.conversations.keys(), fractions)
    return snap


REAL_SOURCES = ("chat", "arena", "import")
"""Where real people's conversations come from; "simulated" is the other kind."""


def check_sources(snap: Snapshot, sources: list[str]) -> None:
    """A training job on a database with both real and simulated feedback must choose."""
    if sources:
        return
    found = {c.source for c in snap.conversations.values()}
    if found & set(REAL_SOURCES) and "simulated" in found:
        raise ValidationError(
            f"sources: the database holds both real ({', '.join(sorted(found - {'simulated'}))}) "
            "and simulated conversations; choose which to train on, e.g. --sources chat,arena "
            "or --sources simulated (or sources: [...] in the job config)"
        )


def freeze_values(snap: Snapshot, path: Path) -> None:
    """Make a resumed job train on the values its first start read: the first call writes the
    ratings' values and the comparisons' choices to `path`; later calls put them back (a rating
    edited after the cut-off keeps its old value here)."""
    if path.is_file():
        saved = json.loads(path.read_text())
        ratings, choices = saved["ratings"], saved["comparisons"]
        snap.ratings = [r for r in snap.ratings if str(r.id) in ratings]
        snap.comparisons = [c for c in snap.comparisons if str(c.id) in choices]
        for r in snap.ratings:
            r.value = ratings[str(r.id)]
        for c in snap.comparisons:
            c.choice = choices[str(c.id)]
        return
    values = {
        "ratings": {str(r.id): r.value for r in snap.ratings},
        "comparisons": {str(c.id): c.choice for c in snap.comparisons},
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(values))
    tmp.replace(path)


def conversations_in(snap: Snapshot, split: str) -> list[int]:
    """The ids of the snapshot's conversations stored in `split`, sorted."""
    if split not in SPLITS:
        raise ValidationError(f"split: {split!r} is not one of {', '.join(SPLITS)}")
    return sorted(c for c in snap.conversations if snap.splits[c] == split)


# ---- summaries ---------------------------------------------------------------------------


@dataclass
class Summary:
    """What a dataset build kept and why it dropped the rest (counts by reason)."""

    name: str
    kept: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)

    def format(self) -> str:
        kept = ", ".join(f"{k}: {n}" for k, n in sorted(self.kept.items())) or "nothing"
        lines = [f"{self.name} dataset: kept {kept}"]
        lines += [f"  dropped {n:>6} {reason}" for reason, n in self.dropped.most_common()]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"kept": dict(self.kept), "dropped": dict(self.dropped)}


# ---- SFT ---------------------------------------------------------------------------------


@dataclass
class SFTDataOptions:
    """Which replies count as good demonstrations."""

    signals: list[str] = field(default_factory=lambda: list(SFT_SIGNALS))
    """Feedback that can select a reply: thumb (more ups than downs), likert, comparison (won)."""
    min_score: float = 0.5
    """A reply whose mean rater-normalised thumb or Likert score (z units, the same scores the
    preference pairs use) reaches this is good; below it a Likert score, and below 0 a thumb
    score, counts against the reply."""
    extra_jsonl: str = ""
    """Optional JSONL of extra training rows: {"messages": [...]} or {"prompt", "completion"}."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.signals) - set(SFT_SIGNALS))
        if unknown or not self.signals:
            raise ValidationError(f"sft signals: {unknown or 'none'}; choose from {SFT_SIGNALS}")


@dataclass
class SFTData:
    """Prompt-completion rows for SFT (train split; `heldout`: the validation split, for
    checkpoint choice), with the message ids behind them."""

    train: list[dict[str, Chat]]
    heldout: list[dict[str, Chat]]
    train_ids: list[int]
    heldout_ids: list[int]
    heldout_conversations: list[int]
    summary: Summary

    def data_ids(self) -> dict[str, Any]:
        return {
            "messages": self.train_ids,
            "heldout_messages": self.heldout_ids,
            "heldout_conversations": self.heldout_conversations,
        }


def _verdicts(snap: Snapshot, min_score: float) -> dict[int, dict[str, int]]:
    """Per reply and signal: +1 good, -1 bad (signals absent are left out).

    Thumbs and Likert ratings in the same rater-normalised unit as the preference pairs
    (`rating_scores`); comparisons one vote per rater and pair; a "both bad" verdict marks
    both replies bad, so neither is ever imitated.
    """
    options = PreferenceOptions()
    verdicts: dict[int, dict[str, int]] = defaultdict(dict)
    for kind in ("thumb", "likert"):
        for mid, (score, _) in rating_scores(snap, options, (kind,)).items():
            if score >= min_score:
                verdicts[mid][kind] = 1
            elif score < 0 or kind == "likert":
                verdicts[mid][kind] = -1
    wins: Counter[int] = Counter()
    both_bad: set[int] = set()
    for (lo, hi), by_rater in comparison_votes(snap).items():
        for _, choice in by_rater.values():
            if choice in ("a", "b"):
                winner, loser = (lo, hi) if choice == "a" else (hi, lo)
                wins[winner] += 1
                wins[loser] -= 1
            elif choice == "both_bad":
                both_bad |= {lo, hi}
    for mid, net in wins.items():
        if net:
            verdicts[mid]["comparison"] = 1 if net > 0 else -1
    for mid in both_bad:
        verdicts[mid]["comparison"] = -1
    return verdicts


def build_sft_data(snap: Snapshot, options: SFTDataOptions) -> SFTData:
    """Replies rated well by an enabled signal (and badly by none), with their context."""
    summary = Summary("SFT")
    verdicts = _verdicts(snap, options.min_score)
    rows: dict[str, list[dict[str, Chat]]] = {"train": [], "heldout": []}
    ids: dict[str, list[int]] = {"train": [], "heldout": []}
    for mid, msg in snap.messages.items():
        if msg.role != "assistant":
            continue
        votes = {k: v for k, v in verdicts.get(mid, {}).items() if k in options.signals}
        context = snap.context(mid)
        reason = (
            "failed or empty reply" if msg.error or not msg.content.strip()
            else "not rated by an enabled signal" if not votes
            else "conflicting feedback" if 1 in votes.values() and -1 in votes.values()
            else "rated badly" if 1 not in votes.values()
            else "context does not end with a user turn" if not context or context[-1]["role"] != "user"
            else ""
        )  # fmt: skip
        stored = snap.split_of(msg.conversation_id)
        if not reason and stored not in ("train", "validation"):
            reason = f"in the {stored} split (no SFT row)"
        if reason:
            summary.dropped[reason] += 1
            continue
        split = "heldout" if stored == "validation" else "train"
        completion = [{"role": "assistant", "content": msg.content}]
        rows[split].append({"prompt": context, "completion": completion})
        ids[split].append(mid)
    if options.extra_jsonl:
        extra = read_sft_jsonl(options.extra_jsonl)
        rows["train"] += extra
        summary.kept["extra (train)"] = len(extra)
    summary.kept["train"] = len(ids["train"])
    summary.kept["heldout"] = len(ids["heldout"])
    summary.kept["train conversations"] = len(
        {snap.messages[i].conversation_id for i in ids["train"]}
    )
    return SFTData(
        rows["train"],
        rows["heldout"],
        ids["train"],
        ids["heldout"],
        conversations_in(snap, "validation"),
        summary,
    )


def read_sft_jsonl(path: str | Path) -> list[dict[str, Chat]]:
    """Extra SFT rows from JSONL: {"messages": [..., assistant]} or {"prompt", "completion"}."""
    path = Path(path)
    if not path.is_file():
        raise ValidationError(f"extra_jsonl: {path} does not exist")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValidationError(f"extra_jsonl: {path} line {n} is not JSON: {exc}") from exc
        if "messages" in row:
            row = {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}
        if (
            not row.get("prompt")
            or not row.get("completion")
            or row["completion"][-1].get("role") != "assistant"
        ):
            raise ValidationError(
                f'extra_jsonl: {path} line {n} needs "messages" ending with an assistant turn, '
                'or "prompt" and "completion" (an assistant message)'
            )
        rows.append({"prompt": row["prompt"], "completion": row["completion"]})
    return rows


# ---- preferences -------------------------------------------------------------------------


@dataclass
class PreferenceOptions:
    """How comparisons and ratings become (chosen, rejected) pairs."""

    use_comparisons: bool = True
    """Use explicit A/B comparisons."""
    use_ratings: bool = True
    """Derive pairs from the ratings of sibling replies (same parent, different mean score)."""
    ties: str = "drop"
    """Ties: "drop", or "equal" (train both orders with no margin, pulling the scores together)."""
    both_bad: str = "drop"
    """Both-bad verdicts: "drop" or "equal" (as for ties)."""
    normalize_raters: bool = True
    """Z-score each rater's scores per kind (and criterion) before averaging them."""
    min_rater_ratings: int = 3
    """Raters with fewer ratings of a kind are not normalised (their raw score is used)."""
    min_rating_gap: float = 0.5
    """Smallest difference of mean scores that makes a rating-derived pair."""
    max_rater_spread: float | None = None
    """Leave a reply out of rating-derived pairs when its ratings span more than this on the
    [-1, 1] scale (thumbs as they are, Likert (v - 3) / 2): its raters disagree, as a
    comparison whose raters disagree is dropped. 1.0 drops a thumbs up beside a thumbs down and
    Likert ratings three or more points apart (a flipped 1 or 5); None keeps every reply."""
    margin_scale: float = 1.0
    """Margin of a rating-derived pair = margin_scale * min(score difference, max_gap)."""
    max_gap: float = 2.0
    """Score differences (z units) above this count as this much: margins stay bounded."""
    comparison_margin: float = 0.0
    """Margin of an explicit comparison (times the share of raters agreeing, net)."""
    train_split: str = "train"
    """The stored split whose pairs are learned from: train (the PPO reward model) or judge."""

    def __post_init__(self) -> None:
        if self.train_split not in ("train", "judge"):
            raise ValidationError(f"train_split: {self.train_split!r} is not one of train, judge")
        if self.max_rater_spread is not None and not self.max_rater_spread >= 0:
            raise ValidationError(
                f"max_rater_spread: must be >= 0 or null, got {self.max_rater_spread}"
            )
        for name in ("ties", "both_bad"):
            if getattr(self, name) not in TIE_POLICIES:
                raise ValidationError(
                    f"{name}: {getattr(self, name)!r} is not one of {TIE_POLICIES}"
                )


@dataclass
class Pair:
    """One preference: `chosen_id` beats `rejected_id` (both replies to the same parent)."""

    conversation_id: int
    chosen_id: int
    rejected_id: int
    margin: float
    source: str
    """comparison, ratings or tie (a tie/both-bad pair trained both ways)."""
    row_ids: list[int]
    """The comparison or rating rows behind the pair."""


@dataclass
class PreferenceData:
    """TRL preference rows ({"prompt", "chosen", "rejected", "margin"}) and the pairs behind
    them: `train` from the learned split, `heldout` from validation (early stopping, checkpoint
    choice), `test` from the test split (the accuracy reported; nothing selects on it)."""

    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    train_pairs: list[Pair]
    heldout_pairs: list[Pair]
    heldout_conversations: list[int]
    summary: Summary
    test: list[dict[str, Any]] = field(default_factory=list)
    test_pairs: list[Pair] = field(default_factory=list)

    def data_ids(self) -> dict[str, Any]:
        pairs = self.train_pairs + self.heldout_pairs + self.test_pairs
        ratings = sorted({i for p in pairs if p.source == "ratings" for i in p.row_ids})
        comparisons = sorted({i for p in pairs if p.source != "ratings" for i in p.row_ids})
        return {
            "comparisons": comparisons,
            "ratings": ratings,
            "pairs": [[p.chosen_id, p.rejected_id] for p in self.train_pairs],
            "heldout_pairs": [[p.chosen_id, p.rejected_id] for p in self.heldout_pairs],
            "test_pairs": [[p.chosen_id, p.rejected_id] for p in self.test_pairs],
            "heldout_conversations": self.heldout_conversations,
        }


def _scaled(r: Rating) -> float:
    """A rating on [-1, 1]: thumbs as they are, Likert 1..5 mapped linearly."""
    return r.value if r.kind == "thumb" else (r.value - 3) / 2


def normalised_ratings(
    snap: Snapshot, normalize: bool = True, min_rater_ratings: int = 3
) -> dict[int, float]:
    """Per rating id: its score in one unit for every rater and kind.

    Each rating is first put on [-1, 1] (`_scaled`). With `normalize`, it becomes a z-score
    against its rater's own ratings of that kind and criterion; a rater with fewer than
    `min_rater_ratings` of them is z-scored against everyone's ratings of that kind and
    criterion instead (never left raw beside z-scores).
    """
    groups: dict[tuple[int, str, str], list[Rating]] = defaultdict(list)
    pooled: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in snap.ratings:
        groups[(r.rater_id, r.kind, r.criterion)].append(r)
        pooled[(r.kind, r.criterion)].append(_scaled(r))
    out: dict[int, float] = {}
    for (_, kind, criterion), group in groups.items():
        values = [_scaled(r) for r in group]
        reference = values if len(values) >= min_rater_ratings else pooled[(kind, criterion)]
        mean, std = _mean_std(reference)
        for r, v in zip(group, values, strict=True):
            out[r.id] = ((v - mean) / std if std > 1e-6 else 0.0) if normalize else v
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5


def rating_scores(
    snap: Snapshot, options: PreferenceOptions, kinds: tuple[str, ...] | None = None
) -> dict[int, tuple[float, list[int]]]:
    """Per reply: its mean normalised score (`normalised_ratings`) over the ratings of `kinds`
    (all when None), and the rating ids behind it."""
    scores = normalised_ratings(snap, options.normalize_raters, options.min_rater_ratings)
    per_message: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for r in snap.ratings:
        if kinds is None or r.kind in kinds:
            per_message[r.message_id].append((scores[r.id], r.id))
    return {
        mid: (sum(s for s, _ in items) / len(items), [i for _, i in items])
        for mid, items in per_message.items()
    }


def comparison_votes(snap: Snapshot) -> dict[tuple[int, int], dict[int, tuple[int, str]]]:
    """Per unordered pair of replies (lo id, hi id): each rater's latest vote, as
    (comparison id, choice) with "a" meaning `lo` won, whichever order the pair was shown in."""
    votes: dict[tuple[int, int], dict[int, tuple[int, str]]] = defaultdict(dict)
    for c in sorted(snap.comparisons, key=lambda c: c.id):
        lo, hi = sorted((c.message_a_id, c.message_b_id))
        flipped = c.message_a_id != lo
        choice = {"a": "b", "b": "a"}.get(c.choice, c.choice) if flipped else c.choice
        votes[(lo, hi)][c.rater_id] = (c.id, choice)  # a later vote replaces the rater's earlier
    return votes


def _comparison_pairs(snap: Snapshot, options: PreferenceOptions, summary: Summary) -> list[Pair]:
    pairs = []
    for (lo, hi), by_rater in comparison_votes(snap).items():
        vs = list(by_rater.values())
        count = Counter(choice for _, choice in vs)
        ids = [i for i, _ in vs]
        conv = snap.messages[lo].conversation_id
        net = count["a"] - count["b"]
        if net:
            margin = options.comparison_margin * abs(net) / len(vs)
            chosen, rejected = (lo, hi) if net > 0 else (hi, lo)
            pairs.append(Pair(conv, chosen, rejected, margin, "comparison", ids))
        elif count["a"]:
            summary.dropped["comparison: raters disagree"] += 1
        else:
            kind = "ties" if count["tie"] >= count["both_bad"] else "both_bad"
            if getattr(options, kind) == "drop":
                summary.dropped[f"comparison: {kind.replace('_', '-')} (dropped by config)"] += 1
                continue
            pairs += [Pair(conv, lo, hi, 0.0, "tie", ids), Pair(conv, hi, lo, 0.0, "tie", ids)]
    return pairs


def rater_spread(snap: Snapshot) -> dict[int, float]:
    """Per rated reply: how far apart its ratings lie on the [-1, 1] scale (0 for one rating)."""
    values: dict[int, list[float]] = defaultdict(list)
    for r in snap.ratings:
        values[r.message_id].append(_scaled(r))
    return {mid: max(vs) - min(vs) for mid, vs in values.items()}


def _rating_pairs(snap: Snapshot, options: PreferenceOptions, summary: Summary) -> list[Pair]:
    scores = rating_scores(snap, options)
    spread = rater_spread(snap)
    siblings: dict[int | None, list[int]] = defaultdict(list)
    for mid in scores:
        msg = snap.messages[mid]
        if msg.role != "assistant" or msg.error:
            continue
        if options.max_rater_spread is not None and spread[mid] > options.max_rater_spread:
            summary.dropped["ratings: raters of a reply disagree (max_rater_spread)"] += 1
            continue
        siblings[msg.parent_id].append(mid)
    pairs = []
    for group in siblings.values():
        for i, x in enumerate(sorted(group)):
            for y in sorted(group)[i + 1 :]:
                gap = scores[x][0] - scores[y][0]
                if abs(gap) < options.min_rating_gap:
                    summary.dropped["ratings: sibling scores too close"] += 1
                    continue
                chosen, rejected = (x, y) if gap > 0 else (y, x)
                conv = snap.messages[x].conversation_id
                ids = scores[x][1] + scores[y][1]
                margin = options.margin_scale * min(abs(gap), options.max_gap)
                pairs.append(Pair(conv, chosen, rejected, margin, "ratings", ids))
    return pairs


def _dedup(snap: Snapshot, pairs: list[Pair], summary: Summary) -> list[Pair]:
    """One pair per (reply, reply) and per text: explicit comparisons win over rating-derived ones."""
    seen_ids: dict[frozenset[int], Pair] = {}
    seen_text: set[tuple[str, str, str]] = set()
    kept = []
    for p in pairs:
        key = frozenset((p.chosen_id, p.rejected_id))
        first = seen_ids.get(key)
        if first is not None and not (p.source == first.source == "tie"):
            clash = " (opposite order)" if first.chosen_id != p.chosen_id else ""
            summary.dropped[f"{p.source}: same replies as a {first.source} pair{clash}"] += 1
            continue
        seen_ids[key] = p
        chosen, rejected = snap.messages[p.chosen_id].content, snap.messages[p.rejected_id].content
        text_key = (json.dumps(snap.context(p.chosen_id)), chosen, rejected)
        if chosen.strip() == rejected.strip() or text_key in seen_text:
            summary.dropped[f"{p.source}: identical replies or duplicate text"] += 1
            continue
        seen_text.add(text_key)
        kept.append(p)
    return kept


def build_preference_data(snap: Snapshot, options: PreferenceOptions) -> PreferenceData:
    """Deduplicated (chosen, rejected) pairs from comparisons and sibling ratings, split by conversation."""
    summary = Summary("preference")
    pairs = _comparison_pairs(snap, options, summary) if options.use_comparisons else []
    pairs += _rating_pairs(snap, options, summary) if options.use_ratings else []
    pairs = _dedup(snap, pairs, summary)
    groups: dict[str, list[Pair]] = {"train": [], "heldout": [], "test": []}
    role = {options.train_split: "train", "validation": "heldout", "test": "test"}
    for p in pairs:
        context = snap.context(p.chosen_id)
        stored = snap.split_of(p.conversation_id)
        if not context or context[-1]["role"] != "user":
            summary.dropped[f"{p.source}: context does not end with a user turn"] += 1
        elif stored not in role:
            summary.dropped[f"{p.source}: in the {stored} split (another stage's data)"] += 1
        elif p.source == "tie" and role[stored] != "train":
            summary.dropped[f"tie: in the {stored} split (ties are not scored)"] += 1
        else:
            groups[role[stored]].append(p)
    for name, group in groups.items():
        for source, n in Counter(p.source for p in group).items():
            summary.kept[f"{name} {source}"] = n
    return PreferenceData(
        [to_row(snap, p) for p in groups["train"]],
        [to_row(snap, p) for p in groups["heldout"]],
        groups["train"],
        groups["heldout"],
        conversations_in(snap, "validation"),
        summary,
        test=[to_row(snap, p) for p in groups["test"]],
        test_pairs=groups["test"],
    )


def to_row(snap: Snapshot, pair: Pair) -> dict[str, Any]:
    """A pair in TRL's conversational preference format, with its margin."""
    return {
        "prompt": snap.context(pair.chosen_id),
        "chosen": [{"role": "assistant", "content": snap.messages[pair.chosen_id].content}],
        "rejected": [{"role": "assistant", "content": snap.messages[pair.rejected_id].content}],
        "margin": float(pair.margin),
    }
