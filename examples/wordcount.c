/*
 * wordcount.c - a small `wc` clone with a word-frequency report.
 *
 * Usage: wordcount [FILE]
 *   With FILE (for example /input/sample.txt inside the sandbox) the file is
 *   read; without it, standard input is read.
 *
 * Output:
 *   line 1:   "<lines> <words> <bytes>"   (same meaning as `wc`)
 *   then up to five lines "<count> <word>" for the most frequent words.
 *
 * For the frequency report a "word" is a maximal run of ASCII letters,
 * lowercased. The `wc` style word count uses whitespace separation instead,
 * just like the real tool.
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TOP_N 5
#define MAX_WORD 64          /* longer letter runs are truncated */

struct entry {
    char *word;
    unsigned long count;
};

/* A simple open-addressing hash table that grows when half full. */
static struct entry *table;
static size_t table_size;    /* always a power of two */
static size_t table_used;

static unsigned long hash_word(const char *s)
{
    unsigned long h = 5381;  /* djb2 */
    while (*s)
        h = h * 33 + (unsigned char)*s++;
    return h;
}

static void table_grow(void)
{
    size_t new_size = table_size ? table_size * 2 : 1024;
    struct entry *fresh = calloc(new_size, sizeof *fresh);
    if (!fresh) {
        fprintf(stderr, "wordcount: out of memory\n");
        exit(1);
    }
    for (size_t i = 0; i < table_size; i++) {
        if (!table[i].word)
            continue;
        size_t j = hash_word(table[i].word) & (new_size - 1);
        while (fresh[j].word)
            j = (j + 1) & (new_size - 1);
        fresh[j] = table[i];
    }
    free(table);
    table = fresh;
    table_size = new_size;
}

static void count_word(const char *w)
{
    if (table_used * 2 >= table_size)
        table_grow();
    size_t i = hash_word(w) & (table_size - 1);
    while (table[i].word) {
        if (strcmp(table[i].word, w) == 0) {
            table[i].count++;
            return;
        }
        i = (i + 1) & (table_size - 1);
    }
    table[i].word = strdup(w);
    if (!table[i].word) {
        fprintf(stderr, "wordcount: out of memory\n");
        exit(1);
    }
    table[i].count = 1;
    table_used++;
}

/* Higher count first; ties broken alphabetically so output is stable. */
static int better(const struct entry *a, const struct entry *b)
{
    if (a->count != b->count)
        return a->count > b->count;
    return strcmp(a->word, b->word) < 0;
}

int main(int argc, char **argv)
{
    FILE *in = stdin;
    if (argc > 1) {
        in = fopen(argv[1], "rb");
        if (!in) {
            fprintf(stderr, "wordcount: %s: %s\n", argv[1], strerror(errno));
            return 1;
        }
    }

    unsigned long lines = 0, words = 0, bytes = 0;
    int in_space_word = 0;           /* inside a whitespace-delimited word */
    char cur[MAX_WORD + 1];
    size_t cur_len = 0;              /* length of current letter run */
    int c;

    while ((c = getc(in)) != EOF) {
        bytes++;
        if (c == '\n')
            lines++;

        /* wc-style word counting */
        if (isspace(c)) {
            in_space_word = 0;
        } else if (!in_space_word) {
            in_space_word = 1;
            words++;
        }

        /* letters-only words for the frequency table */
        if (isalpha(c)) {
            if (cur_len < MAX_WORD)
                cur[cur_len++] = (char)tolower(c);
        } else if (cur_len > 0) {
            cur[cur_len] = '\0';
            count_word(cur);
            cur_len = 0;
        }
    }
    if (cur_len > 0) {
        cur[cur_len] = '\0';
        count_word(cur);
    }
    if (ferror(in)) {
        fprintf(stderr, "wordcount: read error: %s\n", strerror(errno));
        return 1;
    }
    if (in != stdin)
        fclose(in);

    printf("%lu %lu %lu\n", lines, words, bytes);

    /* Pick the top entries with repeated selection: TOP_N is tiny. */
    struct entry *top[TOP_N];
    size_t ntop = 0;
    for (size_t i = 0; i < table_size; i++) {
        struct entry *e = &table[i];
        if (!e->word)
            continue;
        /* insert e into the sorted top[] array if it qualifies */
        size_t pos = ntop;
        while (pos > 0 && better(e, top[pos - 1]))
            pos--;
        if (pos >= TOP_N)
            continue;
        if (ntop < TOP_N)
            ntop++;
        for (size_t k = ntop - 1; k > pos; k--)
            top[k] = top[k - 1];
        top[pos] = e;
    }
    for (size_t i = 0; i < ntop; i++)
        printf("%lu %s\n", top[i]->count, top[i]->word);

    return 0;
}
