__version__ = "0.1.0"
from .optimizer import *
from .callbacks import *
from .optimizers import *
from .lookahead import *
from .wrapper import *
from .fusion import NotTraceable, Sym, cache_dir
from .distributed import *
