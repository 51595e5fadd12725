"""prunerep's Hydra launcher plugins. Hydra instantiates launchers only from the ``hydra_plugins``
namespace package; ``hydra_plugins/`` has no ``__init__.py`` on purpose (other plugins share it)."""
