"""tokenfarm worker: runs on a home-labber's GPU box, measures jobs, sends results back over the queue.

It never holds database credentials; everything it produces travels as a JSON Result.
"""

__version__ = "0.1.0"
