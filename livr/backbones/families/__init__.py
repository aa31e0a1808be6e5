"""The built-in backbone families: each module here registers one `Family` subclass (`@register`), discovered by
livr.backbones.registry at import. Third-party packages add families through the `livr.backbones` entry-point
group (each entry point names a module that registers its family)."""
