"""Request and response models, one module per endpoint family (TGI, OpenAI, admin)."""
