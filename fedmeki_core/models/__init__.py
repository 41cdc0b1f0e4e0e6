"""The torch models of the architectures `fedmeki_core.architectures` names; `fedmeki_core.models.build` builds them."""
