/*
 * hello.c - the smallest useful WASI program.
 *
 * Prints "hello, world", or "hello, <name>" when a name is passed as the
 * first argument. Arguments reach the program through WASI's args_get,
 * so the sandbox decides exactly what argv contains.
 */
#include <stdio.h>

int main(int argc, char **argv)
{
    const char *who = (argc > 1) ? argv[1] : "world";
    printf("hello, %s\n", who);
    return 0;
}
