"""Whether a group's 429s answer our request rate (a limit) or not (noise), from their share before and after a cut.

A limit's 429s respond to the rate: their share rises as we speed up and falls when we slow down. A busy upstream's
429s (OpenRouter relays them; free models send them all day) come at the same share whatever we send. So each 429
is weighed against the *floor*, the 429 share we saw while under any limit (0 until measured):

* While the floor is 0 a 429 is **evidence**: at once with a known limit; while probing an unknown one, once
  ``FIRST_EVIDENCE`` calls were answered (a run's first 429s among a few calls are no share). Once the floor is
  known, a recent share (the last ``RECENT`` seconds) clearly above it only makes the group a **suspect**: those
  seconds were picked for holding 429s, so their share is high by selection and proves nothing (judged on them,
  noise was often taken for a limit). The next ``CONFIRM_SAMPLES`` calls, at the same rate (raises wait), are a
  fresh sample judged once against the floor (``Z_CONFIRM``; an overwhelming excess, ``Z_SURE``, from
  ``CONFIRM_EARLY`` calls on): confirmed, the next 429 is evidence; if not, the suspicion is dropped.
  Evidence pauses every caller and cuts, as before; a 429 that is not evidence does neither (the retry policy
  still waits its Retry-After before sending that call again).
* Evidence starts a **trial**: the share before it (the suspect's fresh sample, or the last ``RECENT`` seconds
  less the 429 that began it) against the share of the calls granted after the pause (at least
  ``TRIAL_SAMPLES``). If the share clearly fell (a one-sided two-proportion test at ``Z_FELL``) the 429s answer
  our rate: a limit, found. If 429s go on at no less than half the share before, back at the floor or while the
  provider accepts more than when it refused, they are noise: the floor becomes the share measured, and the
  group restores the rate it had before the cut, in one step.

Outcomes are samples of calls, on the group's clock; one process's view (with Redis each process judges its own).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Literal

#: Seconds of history kept, and of recent calls a 429 is judged on.
HISTORY = 60.0
RECENT = 10.0
#: Calls granted after a cut's pause before its trial is judged.
TRIAL_SAMPLES = 20
#: ... and the most a trial waits for a clear answer.
MAX_TRIAL = 100
#: "The provider accepts more than when it refused": a minute's accepted calls above this times that level.
MORE_ACCEPTED = 1.1
#: One-sided 95%: "the share fell" and "the share is above the floor" must both be clear.
Z = 1.645
#: The fewest calls a trial's reference share is taken over (fewer count as that many with no 429): the
#: first 429 of a run, alone in its sample, is not a share of 100%.
REFERENCE_SAMPLES = 10
#: "More 429s than before the cut" at one-sided 99%: calling noise an overload cuts the rate again.
Z_OVER = 2.326
#: "It fell" at one-sided 99%: calling noise a limit costs the rate the cut took, for good.
Z_FELL = 2.326

#: Fresh calls a suspicion is judged on, once, and how clear the excess over the floor must be (one-sided 99.9%).
CONFIRM_SAMPLES = 40
Z_CONFIRM = 3.09
#: ... but an overwhelming excess (a limit's window refusing most calls, each then waiting a long Retry-After) is
#: confirmed from this many on, at this z (checked as the sample grows, so far stricter).
CONFIRM_EARLY = 10
Z_SURE = 4.0

#: Calls answered (in the last ``HISTORY`` seconds) before a 429 can be the first evidence of an unknown limit;
#: earlier ones only wait their own Retry-After. A limit below that many calls a minute costs a few more 429s in
#: its first minute.
FIRST_EVIDENCE = 20

Verdict = Literal["unknown", "limit", "noise"]


@dataclass
class Suspect:
    """A recent share clearly above the floor, being checked on the calls sent after it was seen."""

    since: float
    limited: int = 0
    total: int = 0
    confirmed: bool = False


@dataclass(frozen=True)
class _Sample:
    at: float
    limited: bool


@dataclass
class Trial:
    """A cut under test: what the share was before it, and from when calls count as after it."""

    rate_before: float
    after: float
    limited_before: int
    total_before: int
    limited_after: int = 0
    total_after: int = 0
    #: The share of the last ``RECENT`` seconds when the trial began (the first 429 included): what 429s come at
    #: when the cut was not needed; more than that after the cut means the cut was not deep enough.
    reference: float = 0.0
    #: Calls the provider had accepted in the minute before the first cut. A limit never accepts much more than
    #: that in a minute; a provider that does, and goes on refusing the same share, refuses for another reason.
    accepted: float = 0.0
    #: The floor when the trial began, if "before" was a suspect's fresh sample (0: it was not).
    floor: float = 0.0
    #: What the trial found (None while it runs).
    outcome: Verdict | None = None


class RateSignal:
    """The 429 share per moment, the floor, the verdict, and the trial of the last cut."""

    def __init__(self) -> None:
        self.samples: deque[_Sample] = deque()
        self.floor = 0.0
        self.verdict: Verdict = "unknown"
        self.trial: Trial | None = None
        self.suspect: Suspect | None = None

    def _recent(self, now: float, since: float | None = None) -> tuple[int, int]:
        """(429s, calls) granted since ``since`` (default: the last ``RECENT`` seconds)."""
        start = now - RECENT if since is None else since
        limited = total = 0
        for sample in reversed(self.samples):
            if sample.at < start:
                break
            total += 1
            limited += sample.limited
        return limited, total

    def record(self, at: float, limited: bool, now: float, accepted: float = math.inf) -> Trial | None:
        """A call granted at ``at`` was answered (a 429 or not), with ``accepted`` calls accepted in the last
        minute; returns the trial it ends, if it ends one."""
        self.samples.append(_Sample(at, limited))
        while self.samples and self.samples[0].at < now - HISTORY:
            self.samples.popleft()
        suspect = self.suspect
        if suspect is not None and at >= suspect.since:
            suspect.total += 1
            suspect.limited += limited
            if suspect.total >= CONFIRM_EARLY and above(suspect.limited, suspect.total, self.floor, Z_SURE):
                suspect.confirmed = True  # most of the fresh calls refused: no need to wait for the whole sample
            elif suspect.total == CONFIRM_SAMPLES:  # one test on a fixed sample: testing as it grows would
                # find an excess in noise sooner or later
                suspect.confirmed = above(suspect.limited, suspect.total, self.floor, Z_CONFIRM)
                if not suspect.confirmed:
                    self.suspect = None
        trial = self.trial
        if trial is None:
            if self.verdict == "noise":
                self._track_floor(now)
            return None
        if at >= trial.after:
            trial.total_after += 1
            trial.limited_after += limited
        else:  # sent at a rate before the last cut (answered now): the share the cut answered
            trial.total_before += 1
            trial.limited_before += limited
        verdict = judge(trial, accepted)
        if verdict is None:
            return None
        self.trial = None
        trial.outcome = verdict
        self.verdict = verdict
        before = trial.limited_before / max(1, trial.total_before)
        after = trial.limited_after / trial.total_after
        if verdict == "noise":
            self.floor = after
        else:  # a limit: 429s under it come at the lower share (an overload still running is not a floor)
            self.floor = min(after, before, self.floor) if self.floor > 0 else min(after, before)
        return trial

    def _track_floor(self, now: float) -> None:
        """While 429s are noise, the floor follows their share over the history before the recent part."""
        limited = total = 0
        for sample in self.samples:
            if sample.at >= now - RECENT:
                break
            total += 1
            limited += sample.limited
        if total >= TRIAL_SAMPLES:
            self.floor = limited / total

    def evidence(self, now: float, at: float, *, probing: bool = False) -> bool:
        """Does the 429 of a call granted at ``at`` answer our rate? During a trial: if the call was sent before
        the cut (the overload the cut answered), or the calls sent since the cut meet clearly more 429s than
        before it (the cut was not deep enough); before any floor: always with a known limit, and while
        ``probing`` an unknown one once ``FIRST_EVIDENCE`` calls were answered (or every one of at least two was
        a 429); otherwise: a suspect's confirmation (see the module's docstring)."""
        trial = self.trial
        if trial is not None:
            return at < trial.after or overloaded(trial)
        floor = self.floor
        if floor <= 0:
            # A run's first 429s, among a few calls, are no share at all: cutting on them, a run with 10%
            # independent 429s was halved to 30/min in its first seconds and spent a minute on the trial.
            if not probing:
                return True
            total = len(self.samples)
            return total >= FIRST_EVIDENCE or (total >= 2 and all(sample.limited for sample in self.samples))
        suspect = self.suspect
        if suspect is not None:
            return suspect.confirmed
        limited, total = self._recent(now)
        if total >= TRIAL_SAMPLES and above(limited, total, floor, Z):
            self.suspect = Suspect(now)
        return False

    def start_trial(self, rate_before: float, after: float, now: float, *, cut: bool, accepted: float = 0.0) -> None:
        """Evidence at ``now``, and maybe a cut: judge on the calls granted from ``after`` (the pause's end) on.
        A further cut during a trial, or an overload that goes on without one (a sliding window still full), moves
        its start: what was "after" is now part of "before" (a limit cut in steps is judged once the last step is
        under it), and ``rate_before`` stays the rate before the first cut."""
        trial = self.trial
        if trial is None:
            suspect, self.suspect = self.suspect, None
            if suspect is not None:  # a fresh sample, not picked for its 429s: all of it is "before"
                limited, total = suspect.limited, suspect.total
                before_limited, before_total = limited, total
            else:
                limited, total = self._recent(now)
                # The 429 that began the trial is left out of "before": it was chosen for being one, so it would
                # make any share look like it fell. It does count in the reference, which it can only raise.
                before_limited, before_total = max(0, limited - 1), max(0, total - 1)
            # The reference is what 429s come at when the cut was not needed: the floor, once measured.
            reference = self.floor if suspect is not None else max(self.floor, limited / max(REFERENCE_SAMPLES, total))
            self.trial = Trial(rate_before, after, before_limited, before_total, reference=reference,
                               accepted=accepted, floor=self.floor if suspect is not None else 0.0)
            return
        if not cut and not overloaded(trial):
            return
        trial.limited_before += trial.limited_after
        trial.total_before += trial.total_after
        trial.limited_after = trial.total_after = 0
        trial.after = max(trial.after, after)


def above(limited: int, total: int, share: float, z: float) -> bool:
    """Are ``limited`` 429s of ``total`` calls clearly more than ``share`` of them (one-sided binomial test)?"""
    return limited > total * share + z * math.sqrt(total * share * (1 - share)) + 0.5


def overloaded(trial: Trial) -> bool:
    """Did the calls sent since the cut meet clearly more 429s than the trial's reference share (one-sided
    binomial test at ``Z_OVER``)? A limit far below the rate refuses most of them; independent 429s come at the
    same share as before the cut."""
    return above(trial.limited_after, trial.total_after, trial.reference, Z_OVER)


def judge(trial: Trial, accepted: float = math.inf) -> Verdict | None:
    """A limit if the share clearly fell; noise if 429s go on after the cut at no less than half the share
    before it, not clearly above the reference, while the provider accepts more in a minute than it had when
    the trial began (``accepted``: a per-minute limit never does; a sliding window emptied by the pause takes a
    burst at any rate, so a share measured inside that minute says nothing); undecided (None) until
    ``TRIAL_SAMPLES`` calls after the cut, and while neither is clear up to ``MAX_TRIAL`` of them (then noise if
    the provider accepts more than when the trial began, else a limit)."""
    after = trial.total_after
    if after < TRIAL_SAMPLES:
        return None
    if fell(trial):
        return "limit"
    if overloaded(trial):
        return None
    pb = trial.limited_before / max(1, trial.total_before)
    pa = trial.limited_after / after
    # With a floor known, 429s back at it (not clearly above it) after the cut are the noise it measured; a
    # sliding window still full from the overload keeps them clearly above it, and waits for the minute's test.
    at_floor = trial.floor > 0 and not above(trial.limited_after, after, trial.floor, Z)
    if trial.limited_after >= 2 and pa >= pb / 2 and (at_floor or accepted > trial.accepted * MORE_ACCEPTED):
        return "noise"
    if after >= MAX_TRIAL:
        return "noise" if at_floor or accepted > trial.accepted * MORE_ACCEPTED else "limit"
    return None


def fell(trial: Trial) -> bool:
    """Did the 429 share clearly fall after the cut (one-sided two-proportion z-test)?"""
    nb, na = max(1, trial.total_before), max(1, trial.total_after)
    pb, pa = trial.limited_before / nb, trial.limited_after / na
    pooled = (trial.limited_before + trial.limited_after) / (nb + na)
    if pooled <= 0:
        return False
    spread = math.sqrt(pooled * (1 - pooled) * (1 / nb + 1 / na))
    return (spread == 0 and pb > pa) or (spread > 0 and (pb - pa) / spread >= Z_FELL)
