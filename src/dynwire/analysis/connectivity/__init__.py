"""Statistics and figures of the learned connectivity (paper App. 6.5, Figs. 5-7).

``dynwire analyze CHECKPOINT --out DIR`` (or ``python -m dynwire.analysis.connectivity``) runs a
trained model over a dataset split inside :func:`dynwire.record_adjacency` and accumulates, in a
single streaming pass (nothing per sample is kept except a few samples for Fig. 7):

* per stage, the mean and standard deviation over the samples of every edge weight (Figs. 5, 6),
  for the weights actually used (after the Eq. 5 threshold) and for the raw router outputs;
* the per-class mean adjacency;
* the share of closed edges (an edge of the graph whose used weight is 0) and of removed nodes
  (``rec.removed``: blocks the evaluation executor skipped for the sample, Sec. 3.3), per stage,
  per edge and per node;
* the multiply-adds each sample executed (``rec.macs``) and the number of open edges per sample;
* a few samples per class and the most and least confident samples, drawn as graphs (Fig. 7);
* the paper's observations (2) (output-edge weight falls with topological order) and (4)
  (the standard deviation grows with order and with stage) as numbers: per-node means, least-squares
  slope and Spearman correlation.

It writes PNGs, ``analysis.json`` and ``analysis.md``. Convention (as in the paper's Fig. 2): in an
``N x N`` matrix, row ``j`` holds node ``j``'s input edges and column ``i`` node ``i``'s output
edges; node 0 is the stage's input node, node ``N-1`` its output node.

The package runs in one order, and each module imports only those before it:

1. :mod:`.collect`: run a model (or a checkpoint's) over a split inside ``record_adjacency``;
2. :mod:`.stats`: the streaming statistics (:class:`ConnectivityAccumulator`);
3. :mod:`.plots` and :mod:`.report`: the figures, ``analysis.json`` and ``analysis.md``;

then :mod:`.pipeline` (:func:`analyze_checkpoint`: all three for a checkpoint) and :mod:`.cli`
(``dynwire analyze``). This package re-exports the public names of all of them.
"""

from .cli import ANALYZE_DESCRIPTION, add_arguments, build_parser, main_analyze, run_analyze
from .collect import analyze_model, executed_macs, graph_stages, load_for_eval
from .pipeline import analyze_checkpoint
from .report import write_report
from .stats import ConnectivityAccumulator, SampleRecord, StageStats

__all__ = [
    "StageStats",
    "SampleRecord",
    "ConnectivityAccumulator",
    "analyze_model",
    "analyze_checkpoint",
    "executed_macs",
    "graph_stages",
    "load_for_eval",
    "write_report",
    "main_analyze",
    "run_analyze",
    "add_arguments",
    "build_parser",
    "ANALYZE_DESCRIPTION",
]
