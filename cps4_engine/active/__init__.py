"""Active semi-supervised refinement: the loop annotators live in.

- :mod:`~cps4_engine.active.workspace`: a folder with a versioned manifest, label versions
  and per-class provenance; machine output never overwrites a human label.
- :mod:`~cps4_engine.active.queue`: uncertainty of pseudo-labels per case and class, and
  the review queue ranked by it.
- :mod:`~cps4_engine.active.correction`: spine-aware correction tools and the order check.
- :mod:`~cps4_engine.active.rounds`: reviewed cases join the labeled set, stage 2 is
  fine-tuned from the previous round, unreviewed cases get new pseudo-labels.
"""
