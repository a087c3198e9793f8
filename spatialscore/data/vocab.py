"""The shapes-world vocabulary: shapes, named colours with their shade ranges, relations, counts and sign words."""

from __future__ import annotations

SHAPES = ("circle", "square", "triangle", "star")
SIGN_CLASS = "sign"  # signs take part in relations like any object; their text is judged separately

# Named colours as (hue in degrees, saturation, value) centres. Renderers jitter shades around these; the oracle
# classifies hue against the same centres, so the gaps between neighbouring hues (>= 22 degrees) bound the jitter.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.0, 0.82, 0.86),
    "orange": (28.0, 0.88, 0.96),
    "yellow": (52.0, 0.85, 0.95),
    "green": (125.0, 0.75, 0.68),
    "blue": (222.0, 0.80, 0.86),
    "purple": (282.0, 0.62, 0.72),
    "black": (0.0, 0.0, 0.10),
}
CHROMATIC = tuple(c for c in COLORS if c != "black")

RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

PERTURBATION_KINDS = ("swap", "flip", "count", "attribute", "text")

COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
MAX_COUNT = 5

# Sign words: common uppercase English words of 3-6 letters (the text perturbation changes one letter).
SIGN_WORDS = tuple(
    """
    CAT DOG SUN MOON STAR TREE BIRD FISH FROG BEAR LION WOLF DUCK GOAT LAMB MILK BREAD CAKE SOUP RICE SALT
    TEA JAM PIE HAT CAP COAT SHOE SOCK BOOK PEN MAP KEY LOCK DOOR GATE WALL ROOF HOME HOUSE TOWN CITY PARK
    LAKE SEA RIVER HILL ROCK SAND SNOW RAIN WIND FIRE GOLD IRON COIN BANK SHOP MALL CAFE BAR HOTEL ROAD
    BRIDGE TRAIN SHIP BOAT PLANE BIKE CAR BUS TAXI STOP EXIT OPEN SALE FREE HELLO PEACE LOVE HOPE JOY
    SMILE HAPPY MUSIC PIANO DRUM SONG DANCE GAME PLAY WIN GOAL TEAM CLUB SPORT TENNIS CHESS CARD GIFT
    TOY DOLL KITE BALL RING BELL LAMP DESK CHAIR TABLE BED SOFA CLOCK WATCH PHONE RADIO CAMERA PHOTO
    PAPER NOTE MAIL POST NEWS TIME DAY NIGHT WEEK YEAR SPRING SUMMER WINTER NORTH SOUTH EAST WEST LEFT
    RIGHT FRONT BACK GREEN PLANT FLOWER ROSE LILY APPLE LEMON MANGO PEACH GRAPE MELON BERRY HONEY SUGAR
    PIZZA PASTA TACO SUSHI BEACH OCEAN ISLAND FOREST GARDEN FARM BARN FIELD
    """.split()
)
