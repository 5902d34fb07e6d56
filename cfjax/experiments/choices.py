"""100 multiple-choice questions with their answers, written for this project (for the coupled
evaluation of `cfjax experiment coupled`): general knowledge, science, arithmetic, language and
everyday reasoning, four options each, the answer's index last. `--questions FILE` takes others
in the same shape as JSON lines: {"question": ..., "options": [4 strings], "answer": "A".."D"}.
"""

from __future__ import annotations

QUESTIONS: tuple[tuple[str, tuple[str, str, str, str], int], ...] = (
    ("What is the capital of France?", ("Berlin", "Madrid", "Paris", "Rome"), 2),
    ("What is the capital of Japan?", ("Kyoto", "Tokyo", "Osaka", "Seoul"), 1),
    ("What is the capital of Canada?", ("Toronto", "Vancouver", "Montreal", "Ottawa"), 3),
    ("What is the capital of Australia?", ("Canberra", "Sydney", "Melbourne", "Perth"), 0),
    ("What is the capital of Italy?", ("Milan", "Rome", "Naples", "Venice"), 1),
    ("What is the capital of Egypt?", ("Cairo", "Alexandria", "Luxor", "Giza"), 0),
    ("What is the capital of Spain?", ("Barcelona", "Seville", "Madrid", "Valencia"), 2),
    ("What is the capital of Germany?", ("Munich", "Hamburg", "Frankfurt", "Berlin"), 3),
    ("Which is the largest ocean on Earth?", ("Atlantic", "Indian", "Pacific", "Arctic"), 2),
    ("Which is the longest river in Africa?", ("Congo", "Nile", "Niger", "Zambezi"), 1),
    ("On which continent is Brazil?", ("Africa", "Europe", "Asia", "South America"), 3),
    (
        "Which country has the largest population in South America?",
        ("Brazil", "Argentina", "Chile", "Peru"),
        0,
    ),  # fmt: skip
    ("Mount Everest lies in which mountain range?", ("Andes", "Alps", "Himalayas", "Rockies"), 2),
    (
        "Which desert is the largest hot desert in the world?",
        ("Gobi", "Sahara", "Kalahari", "Mojave"),
        1,
    ),  # fmt: skip
    ("What is the largest planet in the solar system?", ("Earth", "Mars", "Jupiter", "Venus"), 2),
    ("Which planet is closest to the Sun?", ("Mercury", "Venus", "Earth", "Mars"), 0),
    ("Which planet is known as the Red Planet?", ("Jupiter", "Mars", "Saturn", "Neptune"), 1),
    ("What is the chemical symbol for water?", ("O2", "CO2", "H2O", "NaCl"), 2),
    ("What is the chemical symbol for gold?", ("Ag", "Au", "Gd", "Go"), 1),
    ("What is the chemical symbol for sodium?", ("So", "Sd", "S", "Na"), 3),
    (
        "What gas do plants absorb from the air for photosynthesis?",
        ("Oxygen", "Nitrogen", "Carbon dioxide", "Helium"),
        2,
    ),  # fmt: skip
    (
        "What gas do humans need to breathe in to live?",
        ("Oxygen", "Hydrogen", "Carbon dioxide", "Argon"),
        0,
    ),  # fmt: skip
    (
        "At what temperature does water boil at sea level, in degrees Celsius?",
        ("50", "90", "100", "120"),
        2,
    ),  # fmt: skip
    ("At what temperature does water freeze, in degrees Celsius?", ("0", "10", "-10", "32"), 0),
    ("How many legs does a spider have?", ("Six", "Eight", "Ten", "Four"), 1),
    ("How many legs does an insect have?", ("Four", "Eight", "Six", "Twelve"), 2),
    ("Which organ pumps blood through the body?", ("Lungs", "Liver", "Brain", "Heart"), 3),
    ("Which organ do humans use to breathe?", ("Lungs", "Stomach", "Kidneys", "Skin"), 0),
    ("What is the hardest natural material?", ("Gold", "Iron", "Diamond", "Quartz"), 2),
    (
        "What is the boiling point of water in degrees Fahrenheit at sea level?",
        ("100", "180", "212", "32"),
        2,
    ),  # fmt: skip
    (
        "Which animal is the largest mammal?",
        ("Elephant", "Blue whale", "Giraffe", "Hippopotamus"),
        1,
    ),  # fmt: skip
    (
        "Which animal is known for its black and white stripes?",
        ("Zebra", "Lion", "Camel", "Wolf"),
        0,
    ),  # fmt: skip
    ("What do bees make?", ("Milk", "Silk", "Honey", "Wool"), 2),
    ("Which bird is a symbol of peace?", ("Eagle", "Crow", "Dove", "Owl"), 2),
    ("What is 2 + 2?", ("3", "4", "5", "6"), 1),
    ("What is 7 + 5?", ("11", "12", "13", "14"), 1),
    ("What is 9 - 4?", ("5", "4", "6", "3"), 0),
    ("What is 6 times 7?", ("36", "42", "48", "49"), 1),
    ("What is 8 times 8?", ("56", "64", "72", "81"), 1),
    ("What is 100 divided by 4?", ("20", "25", "30", "40"), 1),
    ("What is 15 + 27?", ("32", "41", "42", "43"), 2),
    ("What is half of 50?", ("20", "25", "30", "15"), 1),
    ("What is 3 squared?", ("6", "9", "12", "27"), 1),
    ("What is the square root of 81?", ("7", "8", "9", "10"), 2),
    ("How many minutes are in an hour?", ("30", "60", "90", "100"), 1),
    ("How many days are in a week?", ("5", "6", "7", "8"), 2),
    ("How many months are in a year?", ("10", "11", "12", "13"), 2),
    ("How many hours are in a day?", ("12", "20", "24", "30"), 2),
    ("How many sides does a triangle have?", ("Three", "Four", "Five", "Six"), 0),
    ("How many sides does a hexagon have?", ("Five", "Six", "Seven", "Eight"), 1),
    ("How many degrees are in a right angle?", ("45", "90", "180", "360"), 1),
    ("What is the next number: 2, 4, 6, 8, ...?", ("9", "10", "12", "14"), 1),
    ("Which number is a prime number?", ("4", "6", "7", "9"), 2),
    ("Which number is even?", ("3", "7", "11", "14"), 3),
    (
        "Who wrote 'Romeo and Juliet'?",
        ("Charles Dickens", "William Shakespeare", "Jane Austen", "Mark Twain"),
        1,
    ),  # fmt: skip
    (
        "Who painted the Mona Lisa?",
        ("Leonardo da Vinci", "Pablo Picasso", "Vincent van Gogh", "Claude Monet"),
        0,
    ),  # fmt: skip
    (
        "Who was the first person to walk on the Moon?",
        ("Yuri Gagarin", "Buzz Aldrin", "Neil Armstrong", "John Glenn"),
        2,
    ),  # fmt: skip
    (
        "Who developed the theory of relativity?",
        ("Isaac Newton", "Albert Einstein", "Galileo Galilei", "Nikola Tesla"),
        1,
    ),  # fmt: skip
    (
        "Who was the first President of the United States?",
        ("Abraham Lincoln", "Thomas Jefferson", "George Washington", "John Adams"),
        2,
    ),  # fmt: skip
    ("In which year did World War II end?", ("1918", "1939", "1945", "1950"), 2),
    (
        "Which ancient civilization built the pyramids of Giza?",
        ("Romans", "Greeks", "Egyptians", "Vikings"),
        2,
    ),  # fmt: skip
    (
        "Which ship sank in 1912 after hitting an iceberg?",
        ("Lusitania", "Titanic", "Britannic", "Olympic"),
        1,
    ),  # fmt: skip
    ("What is the opposite of 'hot'?", ("Warm", "Cold", "Wet", "Dry"), 1),
    ("What is the opposite of 'up'?", ("Down", "Left", "Over", "High"), 0),
    ("What is the plural of 'child'?", ("Childs", "Childes", "Children", "Childer"), 2),
    ("What is the past tense of 'go'?", ("Goed", "Gone", "Went", "Going"), 2),
    ("Which word is a synonym of 'happy'?", ("Sad", "Joyful", "Angry", "Tired"), 1),
    ("Which word is an antonym of 'big'?", ("Large", "Huge", "Small", "Tall"), 2),
    ("Which of these is a color?", ("Table", "Blue", "Running", "Seven"), 1),
    ("Which of these is a fruit?", ("Carrot", "Potato", "Apple", "Onion"), 2),
    ("Which of these is a vegetable?", ("Banana", "Carrot", "Cherry", "Grape"), 1),
    (
        "Which language is mainly spoken in Brazil?",
        ("Spanish", "Portuguese", "French", "English"),
        1,
    ),  # fmt: skip
    (
        "Which language is mainly spoken in Mexico?",
        ("Spanish", "Portuguese", "Italian", "English"),
        0,
    ),  # fmt: skip
    ("What is the main language of Germany?", ("Dutch", "German", "Danish", "Polish"), 1),
    ("What is the currency of Japan?", ("Yuan", "Won", "Yen", "Rupee"), 2),
    (
        "What is the currency of the United Kingdom?",
        ("Euro", "Dollar", "Pound sterling", "Franc"),
        2,
    ),  # fmt: skip
    ("What do you use to write on a blackboard?", ("Chalk", "Ink", "Paint", "Crayon"), 0),
    ("What do cows mostly eat?", ("Meat", "Grass", "Fish", "Insects"), 1),
    ("What falls from clouds when it rains?", ("Sand", "Snowballs", "Water", "Leaves"), 2),
    ("Which season comes after summer?", ("Spring", "Winter", "Autumn", "Summer"), 2),
    ("What is frozen water called?", ("Steam", "Ice", "Fog", "Dew"), 1),
    ("Which instrument has black and white keys?", ("Guitar", "Violin", "Piano", "Drum"), 2),
    (
        "Which sport uses a bat and a ball and has wickets?",
        ("Cricket", "Tennis", "Golf", "Hockey"),
        0,
    ),  # fmt: skip
    ("How many players are on a soccer team on the field?", ("9", "10", "11", "12"), 2),
    (
        "Which device is used to measure temperature?",
        ("Barometer", "Thermometer", "Ruler", "Scale"),
        1,
    ),  # fmt: skip
    ("What does a compass point to?", ("East", "South", "West", "North"), 3),
    (
        "Which part of the plant absorbs water from the soil?",
        ("Leaves", "Roots", "Flowers", "Seeds"),
        1,
    ),  # fmt: skip
    (
        "What is the main source of light for the Earth during the day?",
        ("The Moon", "The Sun", "Stars", "Lamps"),
        1,
    ),  # fmt: skip
    ("Which metal is liquid at room temperature?", ("Iron", "Mercury", "Copper", "Aluminium"), 1),
    ("What force keeps us on the ground?", ("Magnetism", "Friction", "Gravity", "Electricity"), 2),
    (
        "What is the speed of light closest to?",
        ("300 km/s", "3,000 km/s", "300,000 km/s", "3 km/s"),
        2,
    ),  # fmt: skip
    ("What is the smallest unit of life?", ("Atom", "Cell", "Organ", "Tissue"), 1),
    (
        "Which vitamin does the skin make in sunlight?",
        ("Vitamin A", "Vitamin C", "Vitamin D", "Vitamin K"),
        2,
    ),  # fmt: skip
    ("What is the freezing point of water in degrees Fahrenheit?", ("0", "32", "100", "212"), 1),
    (
        "Which shape has four equal sides and four right angles?",
        ("Rectangle", "Square", "Triangle", "Circle"),
        1,
    ),  # fmt: skip
    (
        "If you have three apples and eat one, how many are left?",
        ("One", "Two", "Three", "Four"),
        1,
    ),  # fmt: skip
    ("If today is Monday, what day is tomorrow?", ("Sunday", "Tuesday", "Wednesday", "Friday"), 1),
    (
        "Which is heavier: a kilogram of iron or a kilogram of feathers?",
        ("The iron", "The feathers", "They weigh the same", "It depends on the weather"),
        2,
    ),  # fmt: skip
    ("What do you call a baby cat?", ("Puppy", "Kitten", "Calf", "Cub"), 1),
    ("What do you call a baby dog?", ("Puppy", "Kitten", "Foal", "Lamb"), 0),
)
LETTERS = "ABCD"
