"""ips: memory-bounded Iterative Patch Selection for gigapixel slides and large 3D volumes."""

__version__ = "0.1.0"
