"""Training-data influence after RapidIn (arXiv 2405.11724): each training example's loss gradient is
compressed to a short RapidGrad sketch (``sketch.py``), the sketches are cached on disk once per model and
dataset (``store.py``), and a query's sketch is scored against the cache by dot product to rank the
training examples that most pushed the model toward (or away from) the query's answer. Nothing heavy is
imported here: the submodules are loaded only by the commands that use them.
"""
