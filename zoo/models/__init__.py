"""Full networks. Every module here is imported by the registry, which runs its ``@register_model``."""
