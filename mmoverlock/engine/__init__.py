"""mmengine extensions of the training runs (hooks); importing registers them."""
from .compile import CompileBackboneHook
from .hooks import FiniteTrainingHook, NonFiniteTrainingError

__all__ = ['CompileBackboneHook', 'FiniteTrainingHook', 'NonFiniteTrainingError']
