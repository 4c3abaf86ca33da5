"""Built-in demo data: small, deterministic, generated on the fly (no downloads)."""
from .demo_data import (
                        DEMO_CLASSES,
                        DEMO_COCO_ROOT,
                        DEMO_SEG_CLASSES,
                        DEMO_SEG_ROOT,
                        ensure_demo_data,
                        generate_ade_shapes,
                        generate_coco_shapes,
                        render_scene,
)

__all__ = ['DEMO_CLASSES', 'DEMO_COCO_ROOT', 'DEMO_SEG_CLASSES', 'DEMO_SEG_ROOT',
           'ensure_demo_data', 'generate_ade_shapes', 'generate_coco_shapes', 'render_scene']
