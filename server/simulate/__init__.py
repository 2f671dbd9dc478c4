"""`adrenaline simulate`: a whole deployment on a simulated clock. The router's placement and
offload decisions (scheduler/), each worker's batcher and block manager (engine/) run unchanged;
only the model runner, the data plane and time are replaced by a cost model.

It lives in server/ because it composes engine/ and scheduler/ as a deployment does, and by
the dependency rule only server/ may import both: the pure parts (event loop, roofline, fits)
import nothing of the serving stack and could move to scheduler/ should a planner need them.
"""
