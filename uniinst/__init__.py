"""UniInst: unique representation for end-to-end, box-free and NMS-free instance segmentation.

The core library needs torch alone; the Ray integration lives in ``uniinst.ray`` and
``ray_jobs/`` and is imported only by them.
"""

__version__ = "0.1.0"
