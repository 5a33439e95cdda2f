"""How many steps on an SFT data set of varied lengths would replay fastmoe's layer graphs, on the CPU.

fastmoe's graphed checkpointing (fastmoe/graphed_checkpointing.py) keeps CUDA graphs for at most MAX_GRAPH_SHAPES row
lengths: a padded batch trains as one packed row rounded up to a quarter octave (half an octave for a run's first rows
of up to 4,096 tokens: padding_free.COARSE_ROUNDING_ROWS), padded up to a followed length once the places are taken, a
length taking a followed one's place where the rows asked for so far would have cost less that way
(GraphedCheckpoint.row_tokens_for_graphs); a length's graphs are per signature, which holds the row's flash layout too
(its offsets' count and, above ROW_AS_LONGEST_MAX_OFFSETS offsets, its longest document rounded up to a power of two).
Which steps then replay graphs, capture them or run eager layers depends only on the sequence of lengths. This drives
the real GraphedCheckpoint (capture=False: the same admission, padding and place-taking, the layer's bodies run
eagerly), padding_free's rounding and the layouts with one tiny layer, over batches of bench_sft.example_lengths, and
prints per shape and number of places: the share of steps that replayed, captured or ran eager layers, the filler's
share of the tokens trained, and a modeled step time over an ideal run (every step graphed, no filler): graphed steps
cost --fixed-ms + --ms-per-token x tokens, eager and capturing steps --eager-cost times that.

    python benchmarks/graph_places.py --shapes 8x1024,4x2048,2x4096 --places 4,8,12 --steps 2000
    python benchmarks/graph_places.py --shapes 8x1024,4x2048,2x4096 --places 8 --steps 70   # bench_sft's window
    python benchmarks/graph_places.py --shapes 4x2048 --places 8 --then 1x4096   # a shift in the data's lengths
    python benchmarks/graph_places.py --shapes 2x2048 --places 8 --steps 60 \
        --step-costs 17.8,0.0162,166,0.0105,324,0.0342   # each kind of step's cost as fitted (FITTED_STEP_COSTS)

The last column counts the steps of --timed (30-69 by default: bench_sft --data examples --warmup 30 --steps 40)
that replayed.

Counted this way, the timed steps 30-69 of bench_sft's H100 runs of 2026-12-07 (stop 55's placement, every longest
document rounded up) are what the runs had: 35 of 40 all replays at 8 x 1024, 24 of 40 at 2 x 4096; and with the row's
length as the longest up to ROW_AS_LONGEST_MAX_OFFSETS offsets, the later runs' 38 at 4 x 2048 and 30 at 2 x 4096 (a
length then took a followed one's place when asked for more than twice as often; with the cost-based rule it counts 35
/ 38 / 33, and an H100 had 38 and 34 at 4 x 2048 and 2 x 4096; over 200 timed steps after 10 (--steps 210 --timed
10,210) at 2 x 4096 181 against the earlier rule's 173, the H100 182 against 174). The defaults model Trinity-Mini's 8
layers on an H100 (graphed: 52 ms at ~2,300 tokens, 87 ms at 4,096; eager steps 2-4x, bench_sft --data examples,
2026-12-07). Nothing is recorded: bench_sft --data examples measures. Batches of one example (1 x 4096) are rounded
like packed rows as the simulation assumes since 2026-12-07; before, they kept their exact lengths and an H100
replayed no step of 200.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import torch

from bench_sft import example_lengths


@dataclasses.dataclass
class Placement:
    steps: int = 0
    replayed: int = 0
    captured: int = 0
    eager: int = 0
    tokens: int = 0  # the examples' tokens
    trained: int = 0  # with the filler
    replayed_steps: list[int] = dataclasses.field(default_factory=list)  # the steps (from 0) that replayed
    step_ms: list[float] = dataclasses.field(default_factory=list)  # each step's modeled time
    step_ideal_ms: list[float] = dataclasses.field(default_factory=list)  # graphed, without filler

    @property
    def modeled_ms(self) -> float:
        return sum(self.step_ms)

    @property
    def ideal_ms(self) -> float:
        return sum(self.step_ideal_ms)

    def window(self, start: int, end: int) -> tuple[float, float]:
        """Steps start to end - 1: the share that replayed, and their modeled time over the ideal."""
        replayed = sum(start <= step < end for step in self.replayed_steps)
        return (replayed / len(self.step_ms[start:end]),
                sum(self.step_ms[start:end]) / sum(self.step_ideal_ms[start:end]))


class _LayerWithLayout(torch.nn.Module):
    """A decoder layer's call as graphed checkpointing sees it: the hidden states, and the packed row's document
    offsets (data) and longest document (a value: part of the signature)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, hidden: torch.Tensor, offsets: torch.Tensor, longest: int) -> torch.Tensor:
        return self.linear(hidden)


def _row_positions(examples: list[int], filler: int) -> torch.Tensor:
    """A packed row's position ids: each example's from 0, then the filler's (a document of its own)."""
    return torch.cat([torch.arange(n) for n in [*examples, filler] if n])[None]


def simulate(batch: int, seq: int, steps: int, places: int, seed: int = 3, fixed_ms: float = 12.0,
             ms_per_token: float = 0.0185, eager_cost: float = 3.0, then: tuple[int, int] | None = None,
             step_costs: tuple[float, ...] | None = None) -> Placement:
    """`steps` batches of `batch` examples of example_lengths(seq) through a GraphedCheckpoint with `places`
    places: how each step's layer ran, and the modeled time. `then` (batch, seq): a shift in the data, `steps` more
    batches of that shape (another draw) after them. `step_costs` (replay, eager, capture: each ms fixed, ms a token)
    model each kind of step on its own instead of fixed_ms, ms_per_token and eager_cost."""
    from fastmoe.graphed_checkpointing import GraphedCheckpoint, as_graph_data
    from fastmoe.padding_free import row_length_for_graphs
    from fastmoe.sliding_window_attention import packed_documents

    eager_calls = []

    def fallback(function, *args):
        eager_calls.append(1)
        return function(*args)

    graphed = GraphedCheckpoint(fallback=fallback, capture=False, max_shapes=places)
    layer = _LayerWithLayout()
    lengths = example_lengths(batch * steps, seq, seed=seed)
    batches = [lengths[step * batch:(step + 1) * batch] for step in range(steps)]
    if then is not None:
        lengths = example_lengths(then[0] * steps, then[1], seed=seed + 1)
        batches += [lengths[step * then[0]:(step + 1) * then[0]] for step in range(steps)]
    if step_costs is None:  # a replay fixed_ms + ms_per_token a token, an eager step and a capture eager_cost times it
        step_costs = (fixed_ms, ms_per_token) + (eager_cost * fixed_ms, eager_cost * ms_per_token) * 2
    replay_ms, eager_ms, capture_ms = ((lambda n, i=i: step_costs[i] + step_costs[i + 1] * n) for i in (0, 2, 4))
    result = Placement()
    for step, examples in enumerate(batches):
        tokens = sum(examples)
        length = row_length_for_graphs(graphed, tokens)
        # The packed row's flash layout, as the attention layers get it: part of their call's signature (none for a
        # row of one example and no filler)
        offsets, longest = packed_documents(_row_positions(examples, length - tokens)) or (None, None)
        if offsets is not None:
            as_graph_data(offsets)
        call = functools.partial(torch.nn.Module.__call__, layer, offsets=offsets, longest=longest)
        eager_before, graphs_before = len(eager_calls), len(graphed.graphs)
        graphed(call, torch.zeros(1, length, 4, requires_grad=True)).sum().backward()
        if len(eager_calls) > eager_before:
            result.eager += 1
            result.step_ms.append(eager_ms(length))
        elif len(graphed.graphs) > graphs_before:
            result.captured += 1
            result.step_ms.append(capture_ms(length))
        else:
            result.replayed += 1
            result.replayed_steps.append(step)
            result.step_ms.append(replay_ms(length))
        result.steps += 1
        result.tokens += tokens
        result.trained += length
        result.step_ideal_ms.append(replay_ms(tokens))
    return result


# Trinity-Mini's 8 layers on H100s, each kind of step fitted to bench_sft --data examples' steps (2026-12-07; 340
# steps of 2 x 4096, 4 x 2048 and 1 x 4096, their kinds from this simulation): a replay 17.8 ms + 16.2 us a token, an
# eager step 166 ms + 10.5 us, a capture 324 ms + 34.2 us (eager steps wait on the host, whose speed differs between
# lent machines: 100-410 ms measured).
FITTED_STEP_COSTS = "17.8,0.0162,166,0.0105,324,0.0342"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="8x1024,4x2048,2x4096,16x512", help="batch x max length, comma-separated")
    parser.add_argument("--places", default="4,8,12", help="numbers of graph places, comma-separated")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=3, help="example_lengths' draw (bench_sft uses 3)")
    parser.add_argument("--fixed-ms", type=float, default=12.0, help="a graphed step's time: this plus ...")
    parser.add_argument("--ms-per-token", type=float, default=0.0185, help="... this per token")
    parser.add_argument("--eager-cost", type=float, default=3.0, help="an eager or capturing step over a graphed one")
    parser.add_argument("--timed", default="30,70", help="START,END: also count the replays of steps START to END - 1 "
                        "(bench_sft --data examples --warmup 30 --steps 40 times steps 30-69)")
    parser.add_argument("--then", metavar="BxS", help="a shift in the data: after --steps steps of each shape, --steps "
                        "more of this one; also prints the steps after the shift by windows")
    parser.add_argument("--step-costs", metavar="R0,R1,E0,E1,C0,C1",
                        help="each kind of step its own cost, ms fixed and ms a token: replay, eager, capture "
                        f"(instead of the three above; fitted to the H100 runs of 2026-12-07: {FITTED_STEP_COSTS})")
    args = parser.parse_args()
    first, end = (int(part) for part in args.timed.split(","))
    step_costs = tuple(float(part) for part in args.step_costs.split(",")) if args.step_costs else None
    then = tuple(int(part) for part in args.then.split("x")) if args.then else None
    print(f"shape     places  replayed  captured  eager  filler  step time / ideal  replayed of steps {first}-{end - 1}")
    for shape in args.shapes.split(","):
        batch, seq = (int(part) for part in shape.split("x"))
        for places in (int(p) for p in args.places.split(",")):
            r = simulate(batch, seq, args.steps, places, args.seed, args.fixed_ms, args.ms_per_token,
                         args.eager_cost, then, step_costs)
            timed = sum(first <= step < end for step in r.replayed_steps)
            print(f"{shape:9s} {places:6d}  {r.replayed / r.steps:8.1%}  {r.captured / r.steps:8.1%}  "
                  f"{r.eager / r.steps:5.1%}  {1 - r.tokens / r.trained:6.1%}  {r.modeled_ms / r.ideal_ms:17.2f}  "
                  f"{timed} of {min(end, r.steps) - first}")
            if then is not None:
                windows = [(0, 200), (200, 500), (500, args.steps)]
                print(f"   then {args.then}, replayed and time / ideal over the steps after the shift: " + ", ".join(
                    "{}-{}: {:.1%} {:.2f}".format(a, b - 1, *r.window(args.steps + a, args.steps + b))
                    for a, b in windows if a < args.steps))


if __name__ == "__main__":
    main()
