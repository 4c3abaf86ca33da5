"""mmengine extensions of the training runs (hooks); importing registers them."""
from .hooks import FiniteTrainingHook, NonFiniteTrainingError

__all__ = ['FiniteTrainingHook', 'NonFiniteTrainingError']
