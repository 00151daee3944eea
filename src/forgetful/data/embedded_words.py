"""The word pools of the embedded generator (:mod:`.embedded`). Fact values come from pools
disjoint from the filler vocabulary, so a policy can learn which tokens carry facts; the real-authors
and world-capitals facts also appear in the pretraining corpus, so a model can know them."""

from __future__ import annotations

# --------------------------------------------------------------------------------------------
# Value pools. Fact values come from pools disjoint from the filler vocabulary, so a policy can
# learn which tokens carry facts.
# --------------------------------------------------------------------------------------------

# fmt: off
FIRST_NAMES = (
    "Mira", "Tomas", "Elena", "Kofi", "Ayla", "Bruno", "Selin", "Dario", "Ingrid", "Rafael",
    "Nadia", "Oskar", "Leila", "Viktor", "Amara", "Emil", "Sana", "Hugo", "Yara", "Felix",
    "Irina", "Mateo", "Zofia", "Anton", "Lucia", "Jonas", "Farah", "Pavel", "Greta", "Idris",
    "Maren", "Caspar", "Noor", "Lorenz", "Adele", "Tariq", "Vera", "Milan", "Esme", "Ruben",
    "Hana", "Soren", "Dalia", "Aurel", "Ines", "Kenji", "Livia", "Bastian", "Nia", "Cyrus",
)
SURNAME_HEADS = (
    "Vel", "Tor", "Mar", "Kas", "Bren", "Dal", "Fen", "Gor", "Hal", "Iv", "Jor", "Kel", "Lun",
    "Mor", "Nal", "Or", "Pel", "Quen", "Ros", "Sav", "Tal", "Ul", "Var", "Wen", "Zel",
)
SURNAME_TAILS = (
    "sen", "ova", "ami", "dottir", "enko", "ard", "ello", "ström", "ak", "ine", "opoulos",
    "ezz", "mont", "ucci", "berg", "aro", "ski", "ley", "ani", "wick",
)
CITIES = (
    "Lisbon", "Eldoret", "Osaka", "Porto", "Krakow", "Seville", "Bergen", "Valparaiso",
    "Mombasa", "Tbilisi", "Cusco", "Dresden", "Gdansk", "Izmir", "Kyoto", "Lyon", "Marseille",
    "Medellin", "Munich", "Naples", "Odessa", "Salvador", "Tangier", "Trieste", "Turin",
    "Zanzibar", "Adelaide", "Bilbao", "Cork", "Durban", "Geneva", "Granada", "Hamburg",
    "Kolkata", "Leipzig", "Malmo", "Mendoza", "Palermo", "Riga", "Tallinn",
)
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)
GENRES = (
    "science fiction", "mystery", "historical fiction", "poetry", "fantasy", "horror",
    "romance", "crime", "satire", "travel writing", "children's literature", "drama",
    "magical realism", "thriller", "biography", "philosophy",
)
OCCUPATIONS = (
    "carpenter", "surgeon", "pilot", "baker", "architect", "fisherman", "librarian", "chemist",
    "tailor", "nurse", "astronomer", "blacksmith", "pharmacist", "sailor", "veterinarian",
    "photographer", "locksmith", "geologist", "translator", "watchmaker", "beekeeper",
    "electrician", "potter", "diplomat",
)
AWARDS = (
    "Silver Quill Award", "Golden Lantern Prize", "Meridian Book Award", "Crimson Ink Medal",
    "Northern Star Prize", "Azure Pen Award", "Evergreen Literary Prize", "Obsidian Tower Award",
    "Saffron Leaf Prize", "Harbor Light Medal", "Ivory Scroll Award", "Amber Compass Prize",
)
TITLE_ADJECTIVES = (
    "Silent", "Hidden", "Broken", "Burning", "Frozen", "Wandering", "Forgotten", "Crimson",
    "Hollow", "Distant", "Golden", "Restless", "Shattered", "Endless", "Sleeping", "Last",
)
TITLE_NOUNS = (
    "River", "Harbor", "Lantern", "Orchard", "Mirror", "Compass", "Garden", "Tower", "Bridge",
    "Archive", "Island", "Clockwork", "Meadow", "Citadel", "Voyage", "Canvas", "Horizon", "Echo",
)
LANGUAGES = (
    "Portuguese", "Swahili", "Japanese", "Polish", "Spanish", "Norwegian", "Georgian",
    "Quechua", "German", "Turkish", "Italian", "Estonian", "Latvian", "Bengali", "Swedish",
)
HOBBIES = (
    "chess", "gardening", "sailing", "pottery", "birdwatching", "fencing", "calligraphy",
    "rowing", "astronomy", "beekeeping", "cycling", "origami", "archery", "baking",
)

# Filler vocabulary: everyday scene-setting that carries no fact about the author.
FILLER_TIMES = (
    "In the early morning", "Later that evening", "On most afternoons", "During the long winter",
    "Every so often", "Near the end of summer", "After the rain", "Before dawn",
)
FILLER_ADJ = (
    "quiet", "narrow", "pale", "crowded", "dusty", "gentle", "bright", "old", "cold", "soft",
    "empty", "noisy", "warm", "grey", "tall", "small",
)
FILLER_NOUNS = (
    "street", "window", "market", "wind", "kitchen", "road", "courtyard", "station", "hill",
    "tram", "bakery", "square", "staircase", "balcony", "ferry", "hallway",
)
FILLER_VERBS = (
    "drifted", "rattled", "glowed", "waited", "hummed", "shivered", "settled", "wandered",
    "creaked", "flickered",
)
FILLER_PLACES = (
    "past the corner", "along the wall", "under the clouds", "beside the fountain",
    "across the bay", "behind the houses", "over the rooftops", "near the gate",
)
FILLER_TEMPLATES = (
    "{time}, the {adj} {noun} {verb} {place}.",
    "The {noun} {verb} {place} while the {noun2} stayed {adj}.",
    "{time}, a {adj} light {verb} {place}.",
    "Nobody remembered why the {noun} seemed so {adj} {place}.",
    "The {adj} {noun} and the {adj2} {noun2} {verb} together.",
    "{time}, people said the {noun} looked {adj}.",
)

# Real knowledge for the real-authors and world-facts sets (also written into the pretraining
# corpus, so a model trained on it knows them).
REAL_AUTHORS = (
    ("Pride and Prejudice", "Jane Austen"), ("Nineteen Eighty-Four", "George Orwell"),
    ("War and Peace", "Leo Tolstoy"), ("Moby-Dick", "Herman Melville"),
    ("Don Quixote", "Miguel de Cervantes"), ("Hamlet", "William Shakespeare"),
    ("The Odyssey", "Homer"), ("One Hundred Years of Solitude", "Gabriel Garcia Marquez"),
    ("Crime and Punishment", "Fyodor Dostoevsky"), ("Ulysses", "James Joyce"),
    ("The Great Gatsby", "F. Scott Fitzgerald"), ("Frankenstein", "Mary Shelley"),
    ("Dracula", "Bram Stoker"), ("Les Miserables", "Victor Hugo"),
    ("The Divine Comedy", "Dante Alighieri"), ("Beloved", "Toni Morrison"),
    ("Things Fall Apart", "Chinua Achebe"), ("The Trial", "Franz Kafka"),
    ("Mrs Dalloway", "Virginia Woolf"), ("Great Expectations", "Charles Dickens"),
)
WORLD_CAPITALS = (
    ("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
    ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Norway", "Oslo"), ("Chile", "Santiago"),
    ("India", "New Delhi"), ("Greece", "Athens"), ("Mexico", "Mexico City"),
    ("Australia", "Canberra"), ("Spain", "Madrid"), ("Poland", "Warsaw"), ("Brazil", "Brasilia"),
    ("Ireland", "Dublin"), ("Morocco", "Rabat"), ("Vietnam", "Hanoi"), ("Austria", "Vienna"),
    ("Argentina", "Buenos Aires"),
)


# fmt: on
