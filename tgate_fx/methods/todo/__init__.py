"""ToDo: downsample the keys and values of self-attention (token downsampling)."""

from .config import ToDoConfig
from .method import ToDo

__all__ = ["ToDo", "ToDoConfig"]
