__version__ = "0.1.0"
from .optimizer import *
from .callbacks import *
from .optimizers import *
from .lookahead import *
from .wrapper import *
from .distributed import *
from .checkpoints import *
from .modern import *
from .param_groups import *
from .memory import *
from .engine.trace import NotTraceable, Sym, Num
from .engine.cpu import cache_dir
from . import optimizer, callbacks, optimizers, lookahead, wrapper, distributed, checkpoints, modern, param_groups, memory

# The public names: what `from fastopt import *` gives, and what the API reference documents
__all__ = [*optimizer.__all__, *callbacks.__all__, *optimizers.__all__, *lookahead.__all__, *wrapper.__all__,
           *distributed.__all__, *checkpoints.__all__, *modern.__all__, *param_groups.__all__, *memory.__all__,
           'NotTraceable', 'Sym', 'Num', 'cache_dir']
