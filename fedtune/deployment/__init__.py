"""How parties meet: the exchange every message goes through."""
